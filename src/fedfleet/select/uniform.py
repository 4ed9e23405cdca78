"""Seeded uniform sampling without replacement (the FedAvg paper's selection)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.core.seeding import generator
from fedfleet.select.base import SELECTORS


@SELECTORS.register("uniform")
@dataclass(frozen=True)
class UniformSelector:
    def select(self, population: int, k: int, round: int, seed: int) -> np.ndarray:
        if not 0 < k <= population:
            raise ValueError(f"cannot select {k} of {population} clients")
        rng = generator(seed, round)
        # Floyd-style sampling: O(k) memory, so 1,000,000 registered clients cost nothing per round
        return np.sort(rng.choice(population, size=k, replace=False, shuffle=False))
