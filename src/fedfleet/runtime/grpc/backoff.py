"""Reconnection delays: exponential with jitter, so parties restarted together do not retry in lockstep."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> Iterator[float]:
    """Delays of ``base * 2**n`` capped at ``cap``, each drawn uniformly from its upper half ("equal jitter")."""
    rng = rng or random.Random()
    n = 0
    while True:
        delay = min(cap, base * 2**n)
        yield delay / 2 + rng.uniform(0, delay / 2)
        n = min(n + 1, 32)
