"""A robust rule as a fold transform of the aggregation pipeline (``fedfleet.core.pipeline``).

``before_fold`` keeps a checked copy of every update (``UpdateStack``; the update also goes on to the
strategy's weighted mean, which still counts weights and averages the clients' metrics), and ``after_fold``
replaces the round's weighted-mean params by the rule's combination of the kept updates. The strategy's
server step then applies it: FedYogi on top of a trimmed mean is FedYogi's step on the trimmed mean.

These rules need every update at once, so they are not ``mergeable`` (an explicit opt-in: the Ray runtime
then sends one update per client) and hold K x model bytes, spilled to a memory-mapped file above
``spill_mb``. Norm bounding (``robust.norm_bound``) is the streaming exception.

Preconditions (Krum: n >= 2f + 3, ...) are checked twice: against the job's cohort when the pipeline is built
(``check_cohort``, a ConfigError naming the key), and against the updates a round really kept, which may be
fewer (clients dropped, updates refused): a round with too few for the rule is incomplete (the loop tries it
again, then stops with the reason), never silently aggregated some other way.

Each round's metrics get anomaly scores: the distance of every kept update to the robust aggregate (max,
mean, median) and how many are farther than ``flag_ratio`` x the median distance, plus the refusals by
reason. The loop shows them with its ``train_`` prefix (``train_robust_dist_max``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fedfleet.core.aggregate import Aggregator
from fedfleet.core.loop import RoundIncomplete
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update
from fedfleet.errors import ConfigError
from fedfleet.robust.stack import UpdateStack, describe

log = logging.getLogger(__name__)


def check_count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: object, allow_zero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


@dataclass(kw_only=True, eq=False)
class RobustCombiner:
    """Base of the rules that combine every update of a round. Subclasses set ``name`` and define ``needs``
    (why n updates are too few, or None) and ``combine`` (the (D,) aggregate and rule-specific metrics)."""

    name: ClassVar[str] = "robust"
    mergeable: ClassVar[bool] = False  # needs every update at once
    memory: ClassVar[str] = "K x model, every update of the round (a memory-mapped file above spill_mb)"

    spill_mb: float = 1024.0  # MiB of kept updates held in RAM; above it they go to a temporary file
    spill_dir: str | None = None  # where that file's folder is made (default: the system's temp folder)
    flag_ratio: float = 3.0  # an update farther than this x the median distance to the aggregate is flagged

    def __post_init__(self) -> None:
        check_positive("spill_mb", self.spill_mb, allow_zero=True)
        check_positive("flag_ratio", self.flag_ratio)
        self._stack: UpdateStack | None = None

    # -- what the rule defines ----------------------------------------------------------------------
    def needs(self, n: int) -> str | None:
        """Why ``n`` updates are too few for this rule (a sentence naming the rule's keys), or None."""
        return None

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- the job and the round ---------------------------------------------------------------------
    def check_cohort(self, cohort: int, key: str) -> None:
        """At configuration time: ``cohort`` updates a round (``key`` names where that number comes from)."""
        why = self.needs(cohort)
        if why is not None:
            raise ValueError(f"{why}, but {key} is {cohort}")

    def start_round(self, global_params: FlatParams, inner: Aggregator) -> None:
        """A new round: forget what an unfinished earlier attempt kept; check the strategy folds a mean."""
        if not getattr(inner, "weighted_mean", False):
            raise ConfigError(
                f"transforms.server {self.name!r} replaces the round's weighted mean, but the strategy aggregates "
                f"with {type(inner).__name__}: use it with a strategy that averages updates (fedavg, fedyogi, ...)"
            )
        self._close()
        self._stack = self._new_stack(global_params)

    def _new_stack(self, like: FlatParams) -> UpdateStack:
        return UpdateStack(like, self.spill_mb, self.spill_dir)

    def before_fold(self, update: Update) -> Update | None:
        if self._stack is None:  # FedBuff folds without rounds: the first arrival gives the layout
            self._stack = self._new_stack(update.params)
        reason = self._stack.add(update)
        if reason is None:
            return update
        log.warning(
            "%s left out the update of %s: %s", self.name, update.client_id, describe(update, reason, self._stack.spec)
        )
        return None

    def after_fold(self, aggregate: Aggregate) -> Aggregate:
        stack, self._stack = self._stack, None
        if stack is None:
            return aggregate
        try:
            why = self.needs(stack.k)
            if why is not None:
                refused = sum(stack.refused.values())
                raise RoundIncomplete(f"{why}, but this round kept {stack.k} ({refused} refused)")
            result, extra = self.combine(stack)
            stack.write(result, aggregate.params)
            aggregate.metrics.update(anomaly_scores(stack, result, self.flag_ratio))
            aggregate.metrics.update({f"robust_{k}": v for k, v in extra.items()})
            self.remember(result)
        finally:
            stack.close()
        return aggregate

    def remember(self, result: Tensor) -> None:
        """What a rule keeps of this round's aggregate for the next (centered clipping's centre)."""

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __getstate__(self) -> dict[str, Any]:  # a copy shipped to a Ray worker carries no round's updates
        return {**self.__dict__, "_stack": None}


def anomaly_scores(stack: UpdateStack, result: Tensor, flag_ratio: float) -> dict[str, float]:
    """Each kept update's L2 distance to the aggregate, summarised, plus the refusals by reason."""
    d = stack.distances_to(result)
    median = float(d.median())
    flagged = int(((d > flag_ratio * median) & (d > 0)).sum())
    scores = {
        "robust_dist_max": float(d.max()),
        "robust_dist_mean": float(d.mean()),
        "robust_dist_median": median,
        "robust_flagged": float(flagged),
        "robust_refused": float(sum(stack.refused.values())),
    }
    scores.update({f"robust_refused_{k}": float(n) for k, n in stack.refused.items() if n})
    if stack.spilled:
        scores["robust_spilled_mb"] = stack.k * stack.row_bytes / 2**20
    return scores


def sort_columns(x: Tensor) -> Tensor:
    """Each column of ``x`` sorted. On a CPU numpy's vectorised sort is used (5x torch's along a short axis, on
    (20, 200K) float32); both give the same values, a sort being exact."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=0))
    return x.sort(dim=0).values


def coordinate_median(x: Tensor) -> Tensor:
    """The median of each column of ``x`` (the mean of the two middle values when the row count is even)."""
    k = x.shape[0]
    v = sort_columns(x)
    return (v[(k - 1) // 2] + v[k // 2]) / 2


def zeros(stack: UpdateStack) -> Tensor:
    return torch.zeros(stack.dim, dtype=stack.dtype, device=stack.device)
