"""``runtime.vectorize: auto``: train a round's clients as one cohort model, or one by one, whichever wins.

On a GPU the cohort path always wins. On a CPU it wins where per-step framework cost and tiny matmuls dominate
(a small model, many clients per round) and loses where each client's step is already a large compute-bound
convolution. The rule, from ``benchmarks/small_model.py --sweep`` on the 2-core sandbox CPU with one torch thread
(sequential / vectorised time per round, 2 to 100 clients; RESULTS.md):

- at least ``MIN_COHORT`` clients in the round (or in a Ray worker's share of it): below 8 the two were within
  noise of each other (0.55-1.5x), from 8 the cohort path won 1.2-4.3x for the MLPs and logistic regression;
- a model of at most ``MAX_PARAMS`` params: the widest model measured (an MLP of 795K params) still won 1.0-2.7x;
  larger ones are left one by one until measured;
- no convolutions: the cohort path runs them client by client on a CPU, and the FEMNIST-like CNN came out
  0.6-1.3x (S's CNN row: 0.77x), so its rounds stay sequential.

The choice is made per round, on the clients that round trains, so a Ray worker decides for its own share.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update

log = logging.getLogger(__name__)

MIN_COHORT = 8
MAX_PARAMS = 1_000_000


def cohort_wins_on_cpu(model: nn.Module, cohort: int) -> tuple[bool, str]:
    """Whether the cohort path is the faster one on a CPU for ``cohort`` clients, and why (for the log)."""
    params = sum(p.numel() for p in model.parameters())
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return False, "convolutions are compute-bound per client on a CPU"
    if params > MAX_PARAMS:
        return False, f"{params:,} params is above the {MAX_PARAMS:,} up to which the cohort path was measured to win"
    if cohort < MIN_COHORT:
        return False, f"{cohort} clients are fewer than the {MIN_COHORT} where the cohort path pays on a CPU"
    return True, f"{cohort} clients of a {params:,}-param model"


class AutoRuntime:
    """The sequential and the cohort runtime over one trainer; each round goes to the faster one on a CPU."""

    parties_in_process = True  # secure aggregation can play the parties here (secagg.in_process)

    def __init__(self, sequential: Any, vectorized: Any) -> None:
        self.sequential = sequential
        self.vectorized = vectorized
        self._said: set[bool] = set()

    @property
    def population(self) -> int:
        return self.sequential.population

    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]:
        wins, why = cohort_wins_on_cpu(self.sequential.trainer.model, len(clients))
        if wins not in self._said:  # one line per choice, not per round
            self._said.add(wins)
            log.info("%s: %s", "training the cohort at once" if wins else "training clients one by one", why)
        return (self.vectorized if wins else self.sequential).fit(global_params, clients, config)

    def round_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.sequential.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sequential.load_state_dict(state)

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        return self.sequential.evaluate(global_params)
