"""Which results the arbiter accepts into the open round. Every refusal has a reason and is counted.

Checked before a byte of params is buffered: right round (not stale, not after the round closed), a task
this party was actually given (no replays of an earlier task), at most one answer per party (no
duplicates), the job's param layout and sizes, a finite weight within bounds, finite typed stats and shown metrics
that are numbers. After the params arrive,
:func:`check_values` checks that every value is finite. Nothing is folded before both pass.
"""

from __future__ import annotations

import math
import threading
from collections import Counter

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.update import TrainStats
from fedfleet.runtime.grpc.chunks import dtype_name
from fedfleet.runtime.grpc.wire import Result, TaskKind


class RoundGate:
    def __init__(self, spec: ParamSpec, max_weight: float) -> None:
        self.spec = spec
        self.max_weight = max_weight
        self._sizes = {dtype_name(d): n for d, n in spec.sizes.items()}
        self._lock = threading.Lock()
        self.round = -1
        self._open = False
        self._tasks: dict[str, str] = {}  # party -> the task id it was given this round
        self._answered: set[str] = set()
        self.rejected: Counter[str] = Counter()  # reason kind -> count, this round

    def open(self, rnd: int, tasks: dict[str, str]) -> None:
        with self._lock:
            self.round, self._open = rnd, True
            self._tasks = dict(tasks)
            self._answered = set()
            self.rejected = Counter()

    def close(self) -> None:
        with self._lock:
            self._open = False

    def admit(self, party: str, result: Result) -> str | None:
        """None when the result may be received; otherwise why not (and it is counted)."""
        with self._lock:
            reason = self._reason(party, result)
            if reason is None:
                self._answered.add(party)
            else:
                self.rejected[reason.split(":")[0]] += 1
            return reason

    def reject(self, reason: str) -> None:
        """Count a refusal found after admission (bad chunk, non-finite values)."""
        with self._lock:
            self.rejected[reason.split(":")[0]] += 1

    def _reason(self, party: str, result: Result) -> str | None:
        if result.round != self.round:
            return f"stale: round {result.round + 1} while round {self.round + 1} is open"
        if not self._open:
            return f"late: round {result.round + 1} is already closed"
        if party not in self._tasks:
            return f"unsolicited: {party} was not selected for round {result.round + 1}"
        if result.task_id != self._tasks[party]:
            return f"replay: task {result.task_id!r} is not the task {party} was given"
        if party in self._answered:
            return f"duplicate: {party} already answered round {result.round + 1}"
        if result.task != TaskKind.EVALUATE and not result.has_params:
            return f"layout: a {result.task} result without params"
        if result.has_params and (result.spec_digest != self.spec.digest or result.sizes != self._sizes):
            return f"layout: params {result.sizes} (digest {result.spec_digest}) do not match the job's {self._sizes}"
        if not (isinstance(result.weight, (int, float)) and math.isfinite(result.weight)):
            return f"weight: {result.weight!r} is not a finite number"
        if not 0 < result.weight <= self.max_weight:
            return f"weight: {result.weight} outside (0, {self.max_weight:g}]"
        return _stats_reason(result) or _metrics_reason(result)


def _stats_reason(result: Result) -> str | None:
    try:
        problem = TrainStats.from_wire(result.stats).check()
    except (TypeError, ValueError) as exc:
        problem = str(exc)
    return f"stats: {problem}" if problem else None


def _metrics_reason(result: Result, most: int = 64) -> str | None:
    """Metrics are only shown, but averaged: a short name and a number each (NaN allowed: a metric may be
    undefined, as AUC is on one class), and not too many."""
    metrics = result.metrics
    if not isinstance(metrics, dict) or len(metrics) > most:
        return f"metrics: not a mapping of at most {most} names to numbers"
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > 100:
            return f"metrics: name {str(name)[:40]!r} is not a short string"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            return f"metrics: {name} is {value!r}, not a number"
    return None


def check_values(params: FlatParams) -> str | None:
    return None if params.isfinite() else "values: NaN or inf in the params"
