"""Krum and multi-Krum (Blanchard et al. 2017): score each update by the sum of its squared distances to its
n - f - 2 nearest others, and average the m updates with the lowest scores (m = 1: Krum itself).

Precondition: n >= 2f + 3, and 1 <= m <= n - f. Why it holds (tests/robust/test_bounds.py): an honest update's
score is at most (n - f - 2) D^2, D the largest distance between honest updates, and at least n - f updates
(the honest ones) score that low, so each of the m chosen does too; a chosen update's n - f - 2 nearest include
at least n - 2f - 2 >= 1 honest one, within sqrt(n - f - 2) D of it. So the aggregate is within
(sqrt(n - f - 2) + 1) D of the honest mean, whatever the attackers send.

Weights are ignored: scores use distances only and the chosen are averaged unweighted, as in the paper; ties
between equal scores go to the lower client id, so the choice does not depend on the arrival order.
Cost: one pass for the (n, n) Gram matrix (float64), one to average the chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedfleet.robust.base import RobustCombiner, check_count
from fedfleet.robust.stack import UpdateStack


def krum_scores(d2: Tensor, f: int) -> Tensor:
    """Each row's sum of squared distances to its max(1, n - f - 2) nearest others (d2: (n, n), zero diagonal)."""
    n = d2.shape[0]
    near = max(1, n - f - 2)
    # a row's own zero sorts first (a duplicate's zero is the same number): skip one zero, keep `near` more
    return d2.sort(dim=1).values[:, 1 : near + 1].sum(1)


def lowest(scores: Tensor, ids: list[int | str], m: int) -> list[int]:
    """The m rows with the lowest scores, ties to the lower client id (ints by value, then names)."""
    order = sorted(range(len(ids)), key=lambda i: (float(scores[i]), _id_key(ids[i])))
    return order[:m]


def _id_key(client: int | str) -> tuple[int, int | str]:
    return (0, client) if isinstance(client, int) else (1, str(client))


@dataclass(kw_only=True, eq=False)
class Krum(RobustCombiner):
    """(Multi-)Krum: the unweighted mean of the m updates closest to their n - f - 2 neighbours."""

    name: ClassVar[str] = "krum"
    f: int  # Byzantine updates tolerated per round
    m: int = 1  # updates averaged: 1 is Krum, more is multi-Krum (at most n - f)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("f", self.f)
        check_count("m", self.m, minimum=1)

    def needs(self, n: int) -> str | None:
        if n < 2 * self.f + 3:
            return f"krum with f={self.f} needs at least 2f + 3 = {2 * self.f + 3} updates per round"
        if self.m > n - self.f:
            return f"krum averages m={self.m} updates, more than n - f = {n - self.f} for n={n}, f={self.f}"
        return None

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        scores = krum_scores(stack.sq_distances(), self.f)
        chosen = lowest(scores, stack.ids, self.m)
        coeffs = torch.full((len(chosen),), 1.0 / len(chosen), dtype=torch.float64)
        return stack.combine(coeffs, rows=chosen), {"selected": float(len(chosen))}
