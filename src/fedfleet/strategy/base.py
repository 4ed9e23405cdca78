"""The strategy interface: a few pure hooks around the one round loop (see ``fedfleet.core.loop``).

A strategy never opens sockets or files; it sees params, aggregates and its own state, nothing else.
Hyperparameters are fields of a frozen dataclass; mutable server state (momentum, Adam moments) lives in
the ``state`` dict the loop owns and checkpoints.
"""

from __future__ import annotations

from typing import ClassVar

from fedfleet.core.aggregate import Aggregator, WeightedMean
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate
from fedfleet.registry import Registry, construct

ServerState = dict[str, FlatParams]


class Strategy:
    """Defaults give FedAvg's behaviour except for the server step, which each strategy defines."""

    name: ClassVar[str] = "strategy"

    def configure_fit(self, config: FitConfig) -> FitConfig:
        """Adjust the clients' training instruction for this round (e.g. FedProx's mu)."""
        return config

    def init_state(self, global_params: FlatParams) -> ServerState:
        """Server optimizer state, created once before round 0 (checkpointed with the model)."""
        return {}

    def aggregator(self, global_params: FlatParams) -> Aggregator:
        """A fresh streaming aggregator for one round; by default the example-weighted mean of deltas."""
        return WeightedMean(global_params)

    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: ServerState) -> None:
        """Apply the round's aggregate to the global params, in place."""
        raise NotImplementedError


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def build_strategy(name: str, **params: object) -> Strategy:
    cls = STRATEGIES.get(name)
    return construct(cls, params, f"strategy {name!r}")
