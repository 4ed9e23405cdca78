"""In-process simulation: the cohort's clients train in turn on ONE trainer (one model, one set of buffers).

Each virtual client is an index range into tensors already on the device, so registering 100,000 clients
costs an offsets array, and switching clients costs nothing but the one-copy load of the global params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from fedfleet.client.local_params import load_local_state, local_state
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.seeding import CLIENT, derive_seed
from fedfleet.core.trainer import Trainer
from fedfleet.core.update import Update


def client_seed(config: FitConfig, client: int) -> int:
    """The local-training seed of one client in one round (identical in every runtime)."""
    return derive_seed(config.seed, CLIENT, config.round, client)


class SequentialRuntime:
    parties_in_process = True  # secure aggregation can play the parties here (secagg.in_process)

    def __init__(self, trainer: Trainer, federation: Any, test_data: Any = None) -> None:
        self.trainer = trainer
        self.federation = federation
        self.test_data = test_data

    @property
    def population(self) -> int:
        return self.federation.num_clients

    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]:
        for cid in clients:
            cid = int(cid)
            local = dataclasses.replace(config, seed=client_seed(config, cid))
            update = self.trainer.fit(global_params, local, self.federation.client(cid))
            update.client_id = cid
            yield update

    def round_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return local_state(self.trainer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_local_state(self.trainer, state)

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        if self.test_data is None:
            return {}
        return self.trainer.evaluate(global_params, self.test_data)
