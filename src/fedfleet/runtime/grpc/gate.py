"""Which results the arbiter accepts into the open round. Every refusal has a reason and is counted.

Checked before a byte of params is buffered: right round (not stale, not after the round closed), a task
this party was actually given (no replays of an earlier task), at most one answer per party (no
duplicates), the job's param layout and sizes, a finite weight within bounds, finite typed stats and shown metrics
that are numbers. After the params arrive,
:func:`check_values` checks that every value is finite and that
the update times its weight cannot overflow the running sum. Nothing is folded before both pass.

A secure round (``MaskedRound``) checks the same of its masked inputs, against the masked layout, and also their
session and the id the party was given; the values under the masks look uniformly random, so the finite and norm
checks move to the party, before it masks (``secagg.SecAggParty.masked_input``). Its stage messages (adverts,
shares, unmask replies) are checked for round, task, session and id by :meth:`RoundGate.admit_stage`.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass
from enum import Enum

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.update import TrainStats
from fedfleet.runtime.grpc.chunks import dtype_name
from fedfleet.runtime.grpc.wire import Result, SecAggMessage, TaskKind


class Rejection(str, Enum):
    """Why a party's answer is refused; counted per round as ``rejected_<kind>``."""

    STALE = "stale"  # for another round than the open one
    LATE = "late"  # the round closed
    UNSOLICITED = "unsolicited"  # the party was not selected
    REPLAY = "replay"  # not the task the party was given
    DUPLICATE = "duplicate"  # the party already answered
    TASK = "task"  # an answer of another kind than the task (an evaluation for a fit task, params with metrics)
    LAYOUT = "layout"  # params of another layout, or none
    WEIGHT = "weight"  # not a finite weight within bounds
    STATS = "stats"  # typed training stats that are not finite (or negative counts)
    METRICS = "metrics"  # shown metrics that are not short names and numbers
    VALUES = "values"  # NaN or inf in the params, or values that could overflow the sum
    NORM = "norm"  # an update longer than network.max_update_norm
    STALLED = "stalled"  # an upload that stood still for network.upload_stall_s
    CHUNKS = "chunks"  # the params' chunks do not cover the buffers exactly
    FAILURE = "failure"  # the party reported it could not do the task
    SESSION = "session"  # a secure round's message for another session
    IDENTITY = "identity"  # a secure round's message claiming another party's id in the round
    SECAGG = "secagg"  # a secure stage's message that is malformed, or that the protocol refuses

    @property
    def final(self) -> bool:
        """The party's answer for the round is bad: the arbiter stops waiting for it."""
        return self in FINAL


FINAL = frozenset({Rejection.TASK, Rejection.LAYOUT, Rejection.WEIGHT, Rejection.STATS, Rejection.METRICS,
                   Rejection.VALUES, Rejection.NORM, Rejection.CHUNKS, Rejection.STALLED,
                   Rejection.SECAGG})  # fmt: skip


class Refusal(str):
    """A refusal's message (``"<kind>: <detail>"``, for logs) with its typed ``kind``, which is what is counted."""

    kind: Rejection

    def __new__(cls, kind: Rejection, detail: str) -> Refusal:
        refusal = super().__new__(cls, f"{kind.value}: {detail}")
        refusal.kind = kind
        return refusal


@dataclass(frozen=True)
class MaskedRound:
    """What a secure round's answers must be: masked inputs of ``spec`` for ``session``, each party's stage
    messages and masked input naming the id it was given (``ids``: party name -> id). ``n`` (the cohort) and
    ``degree`` (the share graph's, at most) bound the stage messages' bodies."""

    spec: ParamSpec
    session: str
    ids: dict[str, int]
    n: int
    degree: int


class RoundGate:
    def __init__(self, spec: ParamSpec, max_weight: float) -> None:
        self.spec = spec
        self.max_weight = max_weight
        self._sizes = {dtype_name(d): n for d, n in spec.sizes.items()}
        self._lock = threading.Lock()
        self.round = -1
        self._open = False
        self._tasks: dict[str, str] = {}  # party -> the task id it was given this round
        self._kind: str = TaskKind.FIT  # what those tasks ask for
        self._answered: set[str] = set()
        self._masked: MaskedRound | None = None
        self.rejected: Counter[str] = Counter()  # reason kind -> count, this round

    def open(
        self, rnd: int, tasks: dict[str, str], kind: str = TaskKind.FIT, masked: MaskedRound | None = None
    ) -> None:
        """Admit answers for ``rnd`` to ``tasks`` (party -> task id), all of ``kind``; masked inputs with ``masked``."""
        with self._lock:
            self.round, self._open, self._kind, self._masked = rnd, True, kind, masked
            self._tasks = dict(tasks)
            self._answered = set()
            self.rejected = Counter()

    def close(self) -> None:
        with self._lock:
            self._open = False

    @property
    def masked_round(self) -> MaskedRound | None:
        """The secure round last opened, if the last round opened was secure."""
        return self._masked

    @property
    def upload_spec(self) -> ParamSpec | None:
        """The layout of the open round's uploads when it is not the model's (a secure round's masked inputs)."""
        masked = self._masked
        return masked.spec if masked is not None else None

    def accepting(self, rnd: int) -> bool:
        """Whether answers for ``rnd`` are still wanted (an upload for a closed round is abandoned)."""
        return self._open and self.round == rnd

    def admit(self, party: str, result: Result) -> Refusal | None:
        """None when the result may be received; otherwise why not (and it is counted)."""
        with self._lock:
            refusal = self._refusal(party, result)
            if refusal is None:
                self._answered.add(party)
            else:
                self.rejected[refusal.kind.value] += 1
            return refusal

    def expects(self, party: str, result: Result) -> Refusal | None:
        """None when ``result`` answers the task ``party`` was given in the open round (a sharded party's other
        ranks: rank 0's result is the one admitted); otherwise why not (counted once rank 0's is refused)."""
        with self._lock:
            if result.round != self.round or not self._open:
                return Refusal(Rejection.LATE, f"round {result.round + 1} is not open")
            if result.task_id != self._tasks.get(party) or result.task != self._kind:
                return Refusal(Rejection.REPLAY, f"task {str(result.task_id)[:40]!r} is not the task {party} was given")
            return None

    def admit_stage(self, party: str, msg: SecAggMessage) -> Refusal | None:
        """None when a secure stage's message belongs to the secure round (its round, the party's task, the session,
        the party's id); otherwise why not (and it is counted). Which stage may speak is the round driver's call."""
        with self._lock:
            refusal = self._stage_refusal(party, msg)
            if refusal is not None:
                self.rejected[refusal.kind.value] += 1
            return refusal

    def reject(self, kind: Rejection) -> None:
        """Count a refusal found after admission (bad chunks, non-finite values, a failed task)."""
        with self._lock:
            self.rejected[kind.value] += 1

    def _refusal(self, party: str, result: Result) -> Refusal | None:
        rnd, R = result.round, Rejection
        if rnd != self.round:
            return Refusal(R.STALE, f"round {rnd + 1} while round {self.round + 1} is open")
        if not self._open:
            return Refusal(R.LATE, f"round {rnd + 1} is already closed")
        if party not in self._tasks:
            return Refusal(R.UNSOLICITED, f"{party} was not selected for round {rnd + 1}")
        if result.task_id != self._tasks[party]:
            return Refusal(R.REPLAY, f"task {result.task_id!r} is not the task {party} was given")
        masked = self._masked
        if masked is not None and result.session != masked.session:
            return Refusal(R.SESSION, f"a masked input for session {str(result.session)[:80]!r}")
        if masked is not None and result.secagg_party != masked.ids[party]:
            return Refusal(R.IDENTITY, f"{party} is party {masked.ids[party]}, not {str(result.secagg_party)[:20]}")
        if party in self._answered:
            return Refusal(R.DUPLICATE, f"{party} already answered round {rnd + 1}")
        if result.task != self._kind:
            return Refusal(R.TASK, f"a {result.task} result for a {TaskKind(self._kind).value} task")
        if result.task == TaskKind.EVALUATE and result.has_params:
            return Refusal(R.TASK, "an evaluate result carries metrics only, not params")
        if result.task != TaskKind.EVALUATE and not result.has_params:
            return Refusal(R.LAYOUT, f"a {result.task} result without params")
        spec = masked.spec if masked is not None else self.spec
        sizes = {dtype_name(d): n for d, n in spec.sizes.items()} if masked is not None else self._sizes
        if result.has_params and (result.spec_digest != spec.digest or result.sizes != sizes):
            detail = f"params {result.sizes} (digest {result.spec_digest}) do not match the round's {sizes}"
            return Refusal(R.LAYOUT, detail)
        if not (isinstance(result.weight, (int, float)) and math.isfinite(result.weight)):
            return Refusal(R.WEIGHT, f"{result.weight!r} is not a finite number")
        if not 0 < result.weight <= self.max_weight:
            return Refusal(R.WEIGHT, f"{result.weight} outside (0, {self.max_weight:g}]")
        return _stats_refusal(result) or _metrics_refusal(result)

    def _stage_refusal(self, party: str, msg: SecAggMessage) -> Refusal | None:
        R, masked = Rejection, self._masked
        if masked is None or msg.round != self.round:
            return Refusal(R.STALE, f"a {msg.kind} for round {str(msg.round)[:20]}, not the open secure round")
        if party not in self._tasks:
            return Refusal(R.UNSOLICITED, f"{party} is not in secure round {self.round + 1}")
        if msg.task_id != self._tasks[party]:
            return Refusal(R.REPLAY, f"a {msg.kind} for task {str(msg.task_id)[:40]!r}, not the task {party} was given")
        if msg.session != masked.session:
            return Refusal(R.SESSION, f"a {msg.kind} for session {str(msg.session)[:80]!r}")
        if msg.party != masked.ids[party]:
            return Refusal(R.IDENTITY, f"{party} is party {masked.ids[party]}, not {str(msg.party)[:20]}")
        return None


def _stats_refusal(result: Result) -> Refusal | None:
    try:
        problem = TrainStats.from_wire(result.stats).check()
    except (TypeError, ValueError) as exc:
        problem = str(exc)
    return Refusal(Rejection.STATS, problem) if problem else None


def _metrics_refusal(result: Result, most: int = 64) -> Refusal | None:
    """Metrics are only shown, but averaged: a short name and a number each (NaN allowed: a metric may be
    undefined, as AUC is on one class), and not too many."""
    metrics = result.metrics
    if not isinstance(metrics, dict) or len(metrics) > most:
        return Refusal(Rejection.METRICS, f"not a mapping of at most {most} names to numbers")
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > 100:
            return Refusal(Rejection.METRICS, f"name {str(name)[:40]!r} is not a short string")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            return Refusal(Rejection.METRICS, f"{name} is {value!r}, not a number")
    return None


# the largest |value| x weight an update may bring to the running sum: float32 ends at 3.4e38, so a million
# such updates still fold without overflowing the sum (a finite update of 3e38 with weight 2 did)
MAX_WEIGHTED_MAGNITUDE = 1e32


def check_values(params: FlatParams, weight: float = 1.0, max_norm: float | None = None) -> Refusal | None:
    """Every value finite, small enough that folding it (times its weight) cannot overflow the sum, and with
    ``max_norm``, an L2 norm within it (for a delta; a party's full params are bounded by the first checks only)."""
    top = params.max_abs()  # one pass: NaN or inf anywhere makes it non-finite
    if not math.isfinite(top):
        return Refusal(Rejection.VALUES, "NaN or inf in the params")
    if top * weight > MAX_WEIGHTED_MAGNITUDE:
        return Refusal(Rejection.VALUES, f"values up to {top:.3g} with weight {weight:g} would overflow the sum")
    if max_norm is not None:
        norm = math.sqrt(params.sq_norm())
        if norm > max_norm:
            detail = f"an update of L2 norm {norm:.4g}, over network.max_update_norm={max_norm:g}"
            return Refusal(Rejection.NORM, detail)
    return None
