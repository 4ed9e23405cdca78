"""Geometric median, as in RFA (Pillutla et al. 2022): the point z minimising sum_k a_k ||z - x_k||, found by
the smoothed Weiszfeld iteration z <- sum_k b_k x_k / sum_k b_k with b_k = a_k / max(nu, ||z - x_k||), from
the weighted mean, for at most ``iters`` iterations or until the objective improves by less than ``tol``
(relative).

Robust while the attackers hold less than half the weight a: if all honest updates lie within r of their
mean c and the attackers' share is alpha < 1/2, the geometric median is within (1 - alpha) / sqrt(1 - 2 alpha)
x r of c (Minsker 2015, Lemma 2.1; tests/robust/test_bounds.py, where a few iterations reach it). The smoothing
nu keeps an update that sits on z from dividing by zero.

Weights: a_k is the update's weight share when ``weighted`` (RFA's rule: a party with more examples pulls
harder, so a party that lies about its weight does too), else 1/n. Cost: two passes per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedfleet.robust.base import RobustCombiner, check_count, check_positive
from fedfleet.robust.stack import UpdateStack


@dataclass(kw_only=True, eq=False)
class GeometricMedian(RobustCombiner):
    """Smoothed Weiszfeld (RFA) geometric median of the round's updates; weighted by default."""

    name: ClassVar[str] = "geomedian"
    iters: int = 5  # Weiszfeld iterations at most (RFA finds 3-5 enough)
    nu: float = 1e-6  # smoothing: distances below nu count as nu
    tol: float = 1e-6  # stop when the objective improves by less than this fraction
    weighted: bool = True  # a_k = w_k / sum w (RFA) rather than 1 / n

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("iters", self.iters, minimum=1)
        check_positive("nu", self.nu)
        check_positive("tol", self.tol, allow_zero=True)
        if not isinstance(self.weighted, bool):
            raise ValueError(f"weighted must be true or false, got {self.weighted!r}")

    def needs(self, n: int) -> str | None:
        return "geomedian needs at least 3 updates per round (of 2 any point between is a median)" if n < 3 else None

    def shares(self, stack: UpdateStack) -> Tensor:
        w = torch.tensor(stack.weights, dtype=torch.float64)
        if not self.weighted or float(w.sum()) <= 0:
            w = torch.ones(stack.k, dtype=torch.float64)
        return w / w.sum()

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        alpha = self.shares(stack).to(stack.device)
        z = stack.combine(alpha)
        d = stack.distances_to(z)
        objective, done = float(alpha @ d), 0
        for done in range(1, self.iters + 1):  # noqa: B007 (the count is reported)
            beta = alpha / d.clamp_min(self.nu)
            z = stack.combine(beta / beta.sum())
            d = stack.distances_to(z)
            before, objective = objective, float(alpha @ d)
            if before - objective <= self.tol * objective:
                break
        return z, {"iters": float(done)}
