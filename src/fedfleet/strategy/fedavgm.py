"""FedAvgM (Hsu, Qi and Brown 2019): server momentum on the averaged delta.

m <- beta * m + delta;  w <- w + server_lr * m. Momentum smooths the noisy direction that a small cohort
of non-IID clients gives each round.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate
from fedfleet.strategy.base import STRATEGIES, ServerState, Strategy


@STRATEGIES.register("fedavgm")
@dataclass(frozen=True)
class FedAvgM(Strategy):
    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def init_state(self, global_params: FlatParams) -> ServerState:
        return {"momentum": global_params.zeros_like()}

    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: ServerState) -> None:
        m = state["momentum"]
        m.mul_(self.momentum).add_(aggregate.params)
        global_params.add_(m, alpha=self.server_lr)
