"""Adaptive server optimizers (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2).

The averaged client delta is a pseudo-gradient (negated). With it:
    m <- beta1 * m + (1 - beta1) * delta
    v <- <the subclass's second-moment rule>
    w <- w + server_lr * m / (sqrt(v) + tau)
No bias correction, as in the paper. v starts at tau^2 (the paper asks v_{-1} >= tau^2), so the first
steps are not huge where the deltas are tiny. FedAdam, FedYogi and FedAdagrad differ only in ``second_moment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate
from fedfleet.strategy.base import ServerState, Strategy


@dataclass(frozen=True)
class FedOpt(Strategy):
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    def init_state(self, global_params: FlatParams) -> ServerState:
        v = global_params.zeros_like()
        for b in v:
            b.fill_(self.tau**2)
        return {"m": global_params.zeros_like(), "v": v}

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Update v in place from delta^2."""
        raise NotImplementedError

    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: ServerState) -> None:
        for dtype, w in global_params.buffers.items():
            delta = aggregate.params.buffers[dtype]
            m, v = state["m"].buffers[dtype], state["v"].buffers[dtype]
            m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            self.second_moment(v, delta * delta)
            w.addcdiv_(m, v.sqrt().add_(self.tau), value=self.server_lr)
