"""FedYogi (Reddi et al. 2021): v <- v - (1 - beta2) * delta^2 * sign(v - delta^2).

Unlike Adam, v moves additively towards delta^2, so a few large pseudo-gradients cannot blow up the
effective learning rate's denominator at once: more stable with heterogeneous clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.strategy.base import STRATEGIES
from fedfleet.strategy.fedopt import FedOpt


@STRATEGIES.register("fedyogi")
@dataclass(frozen=True)
class FedYogi(FedOpt):
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1 - self.beta2)
