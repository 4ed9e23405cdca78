"""Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?"): scale each delta down to L2
norm at most M before it is folded, so no party moves the model by more than M / n of the round.

Streaming, one update at a time, with O(model) memory whatever the cohort. M is fixed (``max_norm``), or
adaptive (``multiplier``): multiplier x the median of the raw norms of the last ``window`` updates of earlier
rounds, robust while fewer than half of those came from attackers; until there is any history, ``max_norm``
(if given) bounds the first round. A fixed bound is ``mergeable`` (Ray workers clip what they fold); an
adaptive one keeps the arbiter's memory of norms, so it is not (the workers then send each update; the arbiter
still folds them one at a time). The memory of norms travels in the checkpoint.

Weights are kept: the strategy's weighted mean folds the bounded deltas. An update with NaN or inf, another
layout than the round's model or a weight that is not a finite number >= 0 is refused (counted in
``robust_refused`` and ``robust_refused_<reason>``). Metrics: robust_clipped (how many were scaled down),
robust_bound, and the largest raw norm (robust_norm_max). Under Ray with a fixed bound the workers bound what
they fold, and these counts cover only what the arbiter folded itself.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedfleet.core.aggregate import Aggregator
from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.update import Aggregate, Update
from fedfleet.robust.base import check_count, check_positive
from fedfleet.robust.stack import REFUSALS, describe, refusal

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False)
class NormBound:
    """Scale each delta to norm <= max_norm, or <= multiplier x the median of recent norms; streaming."""

    name: ClassVar[str] = "norm_bound"
    memory: ClassVar[str] = "O(model), one update at a time (adaptive: and the last `window` norms)"

    max_norm: float | None = None  # the fixed bound, or the first round's bound when adaptive
    multiplier: float | None = None  # adaptive: the bound is multiplier x the median of recent norms
    window: int = 100  # norms remembered for the adaptive bound
    _norms: list[float] = field(default_factory=list, init=False, repr=False)  # earlier rounds' raw norms
    _round: list[float] = field(default_factory=list, init=False, repr=False)  # this round's raw norms
    _clipped: int = field(default=0, init=False, repr=False)
    _refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSALS, 0), init=False, repr=False)
    _spec: ParamSpec | None = field(default=None, init=False, repr=False)  # the round's model layout

    def __post_init__(self) -> None:
        if self.max_norm is None and self.multiplier is None:
            raise ValueError("norm_bound needs max_norm (a fixed bound) or multiplier (adaptive), or both")
        if self.max_norm is not None:
            check_positive("max_norm", self.max_norm)
        if self.multiplier is not None:
            check_positive("multiplier", self.multiplier)
        check_count("window", self.window, minimum=1)

    @property
    def mergeable(self) -> bool:
        return self.multiplier is None  # an adaptive bound learns from every norm at the arbiter

    def bound(self) -> float | None:
        if self.multiplier is not None and self._norms:
            return self.multiplier * statistics.median(self._norms)
        return self.max_norm

    def start_round(self, global_params: FlatParams, inner: Aggregator) -> None:
        self._spec = global_params.spec
        self._reset()

    def _reset(self) -> None:
        self._round, self._clipped, self._refused = [], 0, dict.fromkeys(REFUSALS, 0)

    def before_fold(self, update: Update) -> Update | None:
        if not update.is_delta:
            raise ValueError("norm_bound bounds a delta; this update carries the params themselves (is_delta=False)")
        spec = self._spec or update.params.spec  # FedBuff folds without rounds: the update's own layout
        reason = refusal(update, spec)
        if reason is not None:
            self._refused[reason] += 1
            log.warning("norm_bound left out the update of %s: %s", update.client_id, describe(update, reason, spec))
            return None
        norm = math.sqrt(update.params.sq_norm())
        self._round.append(norm)
        bound = self.bound()
        if bound is not None and norm > bound:
            update.params.mul_(bound / norm)
            self._clipped += 1
        return update

    def after_fold(self, aggregate: Aggregate) -> Aggregate:
        bound = self.bound()
        aggregate.metrics["robust_clipped"] = float(self._clipped)
        aggregate.metrics["robust_refused"] = float(sum(self._refused.values()))
        aggregate.metrics.update({f"robust_refused_{k}": float(n) for k, n in self._refused.items() if n})
        if bound is not None:
            aggregate.metrics["robust_bound"] = bound
        if self._round:
            aggregate.metrics["robust_norm_max"] = max(self._round)
        if self.multiplier is not None:
            self._norms = (self._norms + self._round)[-self.window :]
        self._reset()
        return aggregate

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self._norms)} if self.multiplier is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._norms = [float(n) for n in state.get("norms", [])][-self.window :]
