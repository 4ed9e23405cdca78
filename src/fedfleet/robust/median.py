"""Coordinate-wise median (Yin et al. 2018): each coordinate of the aggregate is the median of that coordinate
over the round's updates (the mean of the two middle values for an even count).

Robust while fewer than half the updates are Byzantine: by monotonicity every coordinate then lies between
the honest values' order statistics that the attackers can shift it to (tests/robust/test_bounds.py).
Weights are ignored: a party can claim any weight, and an order statistic has no weighted form that keeps
the breakdown point. Cost: one sort of K values per coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedfleet.robust.base import RobustCombiner, check_count, coordinate_median, zeros
from fedfleet.robust.stack import UpdateStack


@dataclass(kw_only=True, eq=False)
class Median(RobustCombiner):
    """Coordinate-wise median of the round's updates; weights ignored."""

    name: ClassVar[str] = "median"
    f: int | None = None  # attackers to tolerate per round (optional): then n >= 2f + 1 is required

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.f is not None:
            check_count("f", self.f)

    def needs(self, n: int) -> str | None:
        if self.f is not None and n < max(3, 2 * self.f + 1):
            return f"median with f={self.f} needs at least max(3, 2f + 1) = {max(3, 2 * self.f + 1)} updates per round"
        if n < 3:
            return "median needs at least 3 updates per round (of 2 it is their mean)"
        return None

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        out = zeros(stack)
        for start, stop, x in stack.blocks():
            out[start:stop] = coordinate_median(x)
        return out, {}
