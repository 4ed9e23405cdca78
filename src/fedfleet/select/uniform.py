"""Seeded uniform sampling without replacement (the FedAvg paper's selection), among the checked-in clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.core.seeding import generator
from fedfleet.select.base import SELECTORS, check_k


@SELECTORS.register("uniform")
@dataclass(frozen=True)
class UniformSelector:
    def select(self, population: int, k: int, round: int, seed: int, available: np.ndarray | None = None) -> np.ndarray:
        check_k(k, population, available)
        rng = generator(seed, round)
        # Floyd-style sampling: O(k) memory, so 1,000,000 registered clients cost nothing per round
        if available is None:
            return np.sort(rng.choice(population, size=k, replace=False, shuffle=False))
        return np.sort(available[rng.choice(len(available), size=k, replace=False, shuffle=False)])
