"""The arbiter's privacy ledger when the noise is added by the parties (``where: distributed | local``).

It never sees an update (secure aggregation hides them; ``after_fold_only``): after each round it composes the
round's mechanism into the accountant, from the number of updates that were actually folded.

- distributed: n of the m expected parties survived, each with noise std z C / sqrt(m): the sum's noise is
  z C sqrt(n / m), so the round's multiplier is z sqrt(n / m) (fewer parties, less noise, more epsilon; the
  metrics say so: ``dp_noise_multiplier`` is the effective one, ``dp_parties``).
- local: each update carries noise std z C of its own; replacing a party's data moves its update by up to
  2 C, so each round is a Gaussian of multiplier z / 2, with no amplification from sampling (the arbiter
  knows who took part). The epsilon reported is for a party that took part in every round so far.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from fedfleet.core.update import Aggregate, Update
from fedfleet.privacy.accountant import Accountant
from fedfleet.privacy.budget import Budget


class PrivacyLedger:
    mergeable: ClassVar[bool] = True
    after_fold_only: ClassVar[bool] = True  # composes with secure aggregation: it looks at no update
    memory: ClassVar[str] = "none"

    def __init__(self, where: str, noise_multiplier: float, expected_count: float, sampling_rate: float,
                 accountant: Accountant, budget: Budget | None = None) -> None:  # fmt: skip
        self.where, self.z, self.m, self.q = where, float(noise_multiplier), float(expected_count), sampling_rate
        self.accountant, self.budget = accountant, budget
        self._metrics: dict[str, float] = {}

    def round_multiplier(self, parties: int) -> float:
        if self.where == "local":
            return self.z / 2.0
        return self.z * math.sqrt(min(parties, self.m) / self.m)

    def start_round(self, global_params: Any, inner: Any) -> None:
        if self.budget is not None:  # as if every expected party survives: the round's best case
            self.budget.check_next(self.accountant, self.q, self.round_multiplier(int(self.m)))

    def before_fold(self, update: Update) -> Update:
        return update

    def after_fold(self, aggregate: Aggregate) -> Aggregate:
        z = self.round_multiplier(aggregate.count)
        self.accountant.compose(self.q, z)
        self._metrics = {"dp_noise_multiplier": z, "dp_parties": float(aggregate.count),
                         "dp_epsilon": self.accountant.epsilon(), "dp_delta": self.accountant.delta}  # fmt: skip
        if self.budget is not None:
            self._metrics["dp_epsilon_budget"] = self.budget.epsilon
        return aggregate

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])
