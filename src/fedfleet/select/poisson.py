"""Poisson sampling: each client takes part with probability q = k / population, independently of the others.

This is the draw differential privacy's amplification by sampling assumes (``fedfleet.privacy.accountant``):
the cohort's size varies around ``k``. Drawn as a Binomial(population, q) size and then a uniform subset of that
size, which is the same distribution in O(size) memory. A draw of nobody (probability (1 - q) ** population,
e^-k for a large population) is drawn again; the accountant ignores this conditioning, which for k >= 10
changes the sampling probabilities by less than 5e-5.

``secret``: the round's draw comes from a key taken from the operating system when the selector is made, not
from the job's seed: amplification only holds if nobody can tell who was sampled (``privacy.noise: secure``).
"""

from __future__ import annotations

import os

import numpy as np

from fedfleet.core.seeding import generator
from fedfleet.select.base import SELECTORS, check_k


@SELECTORS.register("poisson")
class PoissonSelector:
    def __init__(self, secret: bool = False) -> None:
        self.secret = bool(secret)
        self._key = int.from_bytes(os.urandom(8), "little") if self.secret else None

    def select(self, population: int, k: int, round: int, seed: int, available: np.ndarray | None = None) -> np.ndarray:
        check_k(k, population, available)
        pool = population if available is None else len(available)
        rng = generator(seed, round) if self._key is None else generator(self._key, round)
        q = k / pool
        size = 0
        while size == 0:
            size = int(rng.binomial(pool, q))
        picked = np.sort(rng.choice(pool, size=size, replace=False, shuffle=False))
        return picked if available is None else available[picked]
