"""Bulyan (El Mhamdi et al. 2018): choose theta = n - 2f updates by Krum, one at a time (each time among those
left), then for each coordinate average the beta = theta - 2f values of the chosen that are closest to their
median.

Precondition: n >= 4f + 3. Why it holds (tests/robust/test_bounds.py): at most f of the theta chosen are
Byzantine and theta >= 2f + 3, so each coordinate's median of the chosen lies within the honest values' range;
the beta closest to it are no farther than the beta-th closest honest value, so every averaged value, and
their mean, is within 2 x (the honest range at that coordinate) of the honest mean.

The repeated Krum uses max(1, n' - f - 2) neighbours among the n' updates left, as Flower's does (the last
choices have fewer than n' - f - 2 candidates). Weights are ignored; ties go to the lower client id.
Cost: one pass for the Gram matrix, one over the chosen for the coordinate step (a sort per coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedfleet.robust.base import RobustCombiner, check_count, coordinate_median, zeros
from fedfleet.robust.krum import krum_scores, lowest
from fedfleet.robust.stack import UpdateStack


@dataclass(kw_only=True, eq=False)
class Bulyan(RobustCombiner):
    """Krum chooses n - 2f updates; each coordinate averages the n - 4f of them closest to their median."""

    name: ClassVar[str] = "bulyan"
    f: int  # Byzantine updates tolerated per round

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("f", self.f)

    def needs(self, n: int) -> str | None:
        if n < 4 * self.f + 3:
            return f"bulyan with f={self.f} needs at least 4f + 3 = {4 * self.f + 3} updates per round"
        return None

    def choose(self, stack: UpdateStack) -> list[int]:
        """Krum, repeated: theta = n - 2f rows, each the best of those not chosen yet."""
        d2 = stack.sq_distances()
        left = list(range(stack.k))
        chosen: list[int] = []
        for _ in range(stack.k - 2 * self.f):
            sub = d2[left][:, left]
            best = left[lowest(krum_scores(sub, self.f), [stack.ids[i] for i in left], 1)[0]]
            chosen.append(best)
            left.remove(best)
        return sorted(chosen)

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        chosen = self.choose(stack)
        beta = len(chosen) - 2 * self.f
        out = zeros(stack)
        for start, stop, x in stack.blocks(chosen):
            med = coordinate_median(x)
            nearest = (x - med).abs().topk(beta, dim=0, largest=False).indices
            out[start:stop] = x.gather(0, nearest).mean(0)
        return out, {"selected": float(len(chosen))}
