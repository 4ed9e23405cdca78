"""The privacy budget: a round that would take epsilon past it is refused before anyone trains for it."""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.errors import UserError
from fedfleet.privacy.accountant import Accountant


class PrivacyBudgetSpent(UserError):
    """The next round would spend more privacy than ``privacy.epsilon`` allows; the run stops before it."""


@dataclass
class Budget:
    """``epsilon`` at the accountant's delta. ``planned``: the rounds the noise multiplier was calibrated for
    with (``q``, ``z``): those are known to fit, so the check costs nothing until the run goes past them."""

    epsilon: float
    planned: int = 0
    q: float = 0.0
    z: float = 0.0

    def check_next(self, accountant: Accountant, q: float, z: float) -> None:
        done = accountant.rounds
        if done < self.planned and (q, z) == (self.q, self.z) and accountant.runs in ([], [[q, z, done]]):
            return  # within what calibration proved
        after = accountant.epsilon_after(q, z)
        if after > self.epsilon * (1 + 1e-9):
            raise PrivacyBudgetSpent(
                f"round {done + 1} would take epsilon from {accountant.epsilon():.4g} to {after:.4g}, past "
                f"privacy.epsilon = {self.epsilon:g} at delta = {accountant.delta:g}: the run stops here (its "
                f"checkpoint holds the {done} rounds done); raise the budget or the noise to train longer"
            )
