"""Coordinate-wise trimmed mean (Yin et al. 2018): for each coordinate, drop the b = floor(beta * n) largest
and b smallest values of the round's n updates and average the rest.

Tolerates up to b attackers per round: the trimmed mean is monotone in each input, so with f <= b attackers
anywhere, every coordinate lies between the mean of the honest values kept when the attackers sit at -inf and
at +inf (tests/robust/test_bounds.py). Preconditions: 0 < beta < 0.5, and b >= 1 (a trim of nothing is the
plain mean: refused rather than silently not robust); with ``f``, also b >= f. Weights are ignored (order
statistics). Cost: one sort of n values per coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedfleet.robust.base import RobustCombiner, check_count, sort_columns, zeros
from fedfleet.robust.stack import UpdateStack


@dataclass(kw_only=True, eq=False)
class TrimmedMean(RobustCombiner):
    """Coordinate-wise mean after trimming floor(beta * n) values from each end; weights ignored."""

    name: ClassVar[str] = "trimmed_mean"
    beta: float = 0.1  # the fraction trimmed at each end, 0 < beta < 0.5
    f: int | None = None  # attackers to tolerate per round (optional): then floor(beta * n) >= f is required

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < 0.5:
            raise ValueError(f"beta must be a number with 0 < beta < 0.5 (2 * beta * n < n), got {self.beta!r}")
        if self.f is not None:
            check_count("f", self.f)

    def trimmed(self, n: int) -> int:
        return math.floor(self.beta * n + 1e-9)  # 0.2 * 10 is 2, not 1.9999...

    def needs(self, n: int) -> str | None:
        b = self.trimmed(n)
        least = max(1, self.f or 0)
        if b < least:
            what = f"f={self.f}" if self.f else "1 (trimming none is the plain mean)"
            return f"trimmed_mean with beta={self.beta} trims floor(beta * n) = {b} per end of n={n}, fewer than {what}"
        return None

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        n, b = stack.k, self.trimmed(stack.k)
        out = zeros(stack)
        for start, stop, x in stack.blocks():
            out[start:stop] = sort_columns(x)[b : n - b].mean(0)
        return out, {"trimmed": float(2 * b)}
