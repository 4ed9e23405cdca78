"""FedAdagrad (Reddi et al. 2021): v <- v + delta^2 (beta2 is unused)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.strategy.base import STRATEGIES
from fedfleet.strategy.fedopt import FedOpt


@STRATEGIES.register("fedadagrad")
@dataclass(frozen=True)
class FedAdagrad(FedOpt):
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)
