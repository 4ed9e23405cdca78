"""FedAvg (McMahan et al. 2017): the example-weighted mean of the clients' models.

With deltas, w <- w + server_lr * sum_k n_k (w_k - w) / sum_k n_k; server_lr = 1 is the paper's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate
from fedfleet.strategy.base import STRATEGIES, ServerState, Strategy


@STRATEGIES.register("fedavg")
@dataclass(frozen=True)
class FedAvg(Strategy):
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: ServerState) -> None:
        global_params.add_(aggregate.params, alpha=self.server_lr)
