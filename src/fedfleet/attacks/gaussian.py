"""Gaussian noise: an attacker sends a random delta, each value drawn from N(0, sigma^2), in place of its
update (the "Gaussian Byzantine worker" of Blanchard et al. 2017). Its norm is about sigma x sqrt(model size),
so a plain mean is swamped even by one attacker once sigma is well above the honest deltas' values.

The noise is seeded by the client's seed of the round (from the job's seed), so a run repeats exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.attacks.base import ATTACK, Attack
from fedfleet.core.pipeline import TransformContext
from fedfleet.core.seeding import derive_seed
from fedfleet.core.update import Update


@dataclass(frozen=True, kw_only=True)
class GaussianNoise(Attack):
    sigma: float = 1.0  # standard deviation of each value sent

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or self.sigma <= 0:
            raise ValueError(f"sigma must be a number > 0, got {self.sigma!r}")

    def corrupt(self, update: Update, context: TransformContext) -> Update:
        gen = torch.Generator(device=update.params.device).manual_seed(derive_seed(context.seed, ATTACK))
        for buf in update.params.buffers.values():
            if buf.is_floating_point():
                buf.normal_(0.0, float(self.sigma), generator=gen)
        return update
