"""FedAdam (Reddi et al. 2021): v <- beta2 * v + (1 - beta2) * delta^2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.strategy.base import STRATEGIES
from fedfleet.strategy.fedopt import FedOpt


@STRATEGIES.register("fedadam")
@dataclass(frozen=True)
class FedAdam(FedOpt):
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1 - self.beta2)
