"""Explicit, derived randomness: every decision's seed is a pure function of (job seed, round, client).

Why derived and not a stateful generator: a resumed run, a Ray worker or a remote party computes the same
seed for the same (round, client) without any RNG state being shipped or checkpointed.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (splitmix64 over the keys; fast, no allocation)."""
    x = 0x9E3779B97F4A7C15
    for k in keys:
        x = (x ^ (int(k) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x >> 1


def generator(*keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*keys))


# stream ids keep the seeds of different decisions in one round apart
SELECT, CLIENT, EVAL = 1, 2, 3
