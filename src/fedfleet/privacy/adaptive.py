"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021): the clip norm C follows a target
quantile of the updates' norms, privately.

Each round every update reports b = 1 if its norm was <= C (it was *not* clipped). The arbiter adds Gaussian
noise of std ``count_std`` to the sum of the bits, divides by the expected count, and moves C geometrically:

    C <- C * exp(-lr * (b_mean - quantile))

Too many unclipped updates (b_mean above the quantile) shrink C, too few grow it. (Flower counts the *clipped*
fraction but applies this same rule, so its C runs away; the tests here check convergence from both sides.)

The bit sum is a second Gaussian mechanism: bits recentred to b - 1/2 have sensitivity 1/2, so its noise
multiplier is 2 * count_std. Both mechanisms together are one Gaussian of multiplier z when the update's noise
multiplier is z_update = (z**-2 - (2 * count_std)**-2) ** -0.5 (the paper's Theorem 1): the accountant sees z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedfleet.errors import ConfigError


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """``quantile``: the fraction of updates to leave unclipped; ``lr``: the geometric step; ``count_std``:
    the noise on the count of unclipped updates (None: expected count / 20, the paper's choice)."""

    quantile: float = 0.5
    lr: float = 0.2
    count_std: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"privacy.adaptive.quantile must be in (0, 1), got {self.quantile}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"privacy.adaptive.lr must be a number > 0, got {self.lr}")
        if self.count_std is not None and not (math.isfinite(self.count_std) and self.count_std > 0):
            raise ConfigError(f"privacy.adaptive.count_std must be a number > 0, got {self.count_std}")


def update_multiplier(z: float, count_std: float) -> float:
    """The update's share of the total noise multiplier ``z`` once the count takes its part."""
    rest = z**-2 - (2.0 * count_std) ** -2
    if rest <= 0:
        raise ConfigError(
            f"privacy.adaptive.count_std = {count_std:g} leaves no noise budget for the update at noise multiplier "
            f"{z:.4g}: count_std must be > 1 / (2 z) = {1 / (2 * z):.4g}"
        )
    return rest**-0.5


class AdaptiveClip:
    """The clip norm's state across rounds (it travels in checkpoints)."""

    def __init__(self, config: AdaptiveClipConfig, initial: float, expected_count: float) -> None:
        self.config = config
        self.clip = float(initial)
        self.expected_count = float(expected_count)
        self.count_std = config.count_std if config.count_std is not None else expected_count / 20.0

    def step(self, noisy_unclipped: float) -> float:
        """Move C from the round's noisy count of unclipped updates; returns the noisy fraction used."""
        fraction = noisy_unclipped / self.expected_count
        self.clip *= math.exp(-self.config.lr * (fraction - self.config.quantile))
        return fraction

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])
