"""A party whose own training loop decides when to synchronise: ``ctx.sync(params, weight)``.

Stateful trainers (the Hugging Face Trainer, Lightning) keep their optimizer and schedule across rounds
and reach sync points on their own clock (end of an epoch, every N steps). The stream to the arbiter runs
on a background thread (join, heartbeats, reconnects); the training thread blocks only in ``start`` (for
the first global params) and ``sync`` (for the aggregate of the round it trained for).

Memory: the party holds its model and one receive buffer (``inbox``). The update is the delta from the
global params it started the round from, computed in place in that buffer: the next global params can
only arrive after the arbiter has every update of the round, so the buffer is free by then.

A round the arbiter runs again (too few updates came, a secure round below its threshold) brings a sync task
of the same round: the party answers it with the same work, without training again or spending one of its
syncs, so its schedule stays the arbiter's.

Secure aggregation (``secure``, a ``SecureStages``): the arbiter's stage messages are answered on the stream's
thread while the training thread trains (the keys and the sealed shares of a round are exchanged before its
sync task arrives), and ``sync`` masks the delta, after the party-side transforms (clip, ...), with the shares
of the round it answers: the arbiter never receives this party's update, and never a plain one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import EMPTY, Pipeline, TransformContext
from fedfleet.core.update import NO_STATS, TrainStats, Update
from fedfleet.runtime.grpc.chunks import dtype_name
from fedfleet.runtime.grpc.links import Outbox
from fedfleet.runtime.grpc.party import Connection, PartySession
from fedfleet.runtime.grpc.secure_wire import config_values
from fedfleet.runtime.grpc.wire import Failure, Join, JoinMode, Result, Task, TaskKind
from fedfleet.secagg.errors import SecAggRefused

if TYPE_CHECKING:
    from fedfleet.runtime.grpc.secure_party import SecureStages

log = logging.getLogger("fedfleet.party")


class SyncParty(PartySession):
    mode = JoinMode.SYNC

    def __init__(
        self,
        spec: object,
        connection: Connection,
        rounds: int = 0,
        pipeline: Pipeline | None = None,
        seed: int = 0,
        vocab: str = "",
        secure: SecureStages | None = None,
    ) -> None:
        """``pipeline``: its party-side transforms see each delta before it is sent (``seed``: theirs); ``vocab``:
        the fingerprint of the party's token ids (``hf.data.vocab_fingerprint``), checked against the others';
        ``secure``: the session has secure aggregation, and this party masks every update it sends."""
        super().__init__(spec, connection)
        self.vocab = vocab
        self.secure = secure
        if secure is not None:  # told at join: the arbiter must unmask with the same settings
            self.secure_aggregation = config_values(secure.config)
        self.rounds = rounds  # how many syncs this party will make (tells a model-less arbiter)
        self.pipeline = pipeline or EMPTY
        self.seed = seed
        self.syncs = 0
        self._cv = threading.Condition()
        self._task: Task | None = None  # the round the training thread works on
        self._fresh: Task | None = None  # a task whose params arrived and were not taken yet
        self._receiving = False  # a task's params are being written into the inbox
        self._ended: str | None = None
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._live: FlatParams | None = None  # the training thread's params, for an INIT request
        self._answered: tuple[int, _Answer] | None = None  # the round last answered, and with what (for a retry)
        self._thread: threading.Thread | None = None

    # -- the training thread's side ----------------------------------------------------------------
    def start(self, params: FlatParams, timeout: float | None = None) -> FlatParams:
        """Join the session and load the global params of its first round into ``params`` (in place)."""
        if params.spec != self.spec:
            raise ValueError(f"start() got params of another layout ({params.spec}) than the party's {self.spec}")
        self._live = params
        self._thread = threading.Thread(target=self._stream, name=f"party-{self.conn.name}", daemon=True)
        self._thread.start()
        if not self._take(params, timeout):
            raise ConnectionError(f"the session ended before it started: {self._ended}")
        return params

    def fetch(self, params: FlatParams, timeout: float | None = None) -> FlatParams:
        """Take part in a hand-out session (``SyncArbiter.distribute``): receive the params the arbiter gives
        every party once into ``params`` (in place), then leave."""
        if params.spec != self.spec:
            raise ValueError(f"fetch() got params of another layout ({params.spec}) than the party's {self.spec}")
        self.rounds = 0
        self._live = params
        self._thread = threading.Thread(target=self._stream, name=f"party-{self.conn.name}", daemon=True)
        self._thread.start()
        try:
            self._take(params, timeout)
            if self._task is None:
                raise ConnectionError(f"the hand-out session ended before the params arrived: {self._ended}")
        finally:
            self.close()
        return params

    def sync(
        self,
        params: FlatParams,
        weight: float,
        metrics: dict[str, float] | None = None,
        timeout: float | None = None,
        stats: TrainStats | None = None,
    ) -> bool:
        """Send what this round trained, wait for the aggregate and load it into ``params`` (in place).

        ``weight`` is usually the number of examples trained on since the last sync; ``stats`` what the
        arbiter's strategy and table use of the round's training (its mean loss). Returns ``False`` when
        the session is over (``params`` then hold the final global model), ``True`` to go on training.
        """
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        answer = _Answer(float(weight), dict(metrics or {}), stats or NO_STATS)
        with self._cv:
            received = self._cv.wait_for(lambda: not self._receiving or self._error is not None, timeout)
            self._raise_error()
            if not received:
                raise TimeoutError(f"{self.conn.name}: the arbiter's params did not finish arriving within {timeout} s")
            task, fresh = self._task, self._fresh
            if task is not None and fresh is not None and fresh.task == TaskKind.SYNC and fresh.round == task.round:
                # the arbiter runs this round again (too few updates came): this work answers the new attempt
                task, self._task, self._fresh = fresh, fresh, None
            if self._fresh is not None or task is None:
                log.warning(
                    "%s: the arbiter moved on while this party trained; its work since the last sync is dropped "
                    "and it continues from the newer global params",
                    self.conn.name,
                )
            elif task.task == TaskKind.SYNC and self._outbox is not None:
                self._answer(task, params, answer, self._outbox)
                self.syncs += 1
        return self._take(params, timeout)

    def _answer(self, task: Task, params: FlatParams, answer: _Answer, outbox: Outbox) -> None:
        """Send ``params``' delta from the round's global params (in the inbox) for ``task``, after the party-side
        transforms, masked on a secure session. The caller holds the condition, so no task's params arrive into
        the inbox meanwhile."""
        self._answered = (task.round, answer)
        delta = self._delta(params)
        update = Update(delta, answer.weight, answer.metrics, self.conn.name, True, answer.stats)
        update = self.pipeline.on_party(update, TransformContext(task.round, self.conn.name, self.seed))
        if self.secure is None:
            header = Result(
                task_id=task.task_id,
                round=task.round,
                task=TaskKind.SYNC,
                weight=float(update.weight),
                metrics={k: float(v) for k, v in update.metrics.items()},
                stats=update.stats.to_wire(),
                has_params=True,
                is_delta=True,
                spec_digest=self.spec.digest,
                sizes=_sizes(update.params),
            )
            self.send_params(outbox, header, update.params)
            return
        try:  # checked here, where the values are still visible: no NaN or inf, every value clipped, weight capped
            header, masked = self.secure.mask(task, update)
        except (SecAggRefused, ValueError) as exc:  # never a plain update: the round goes on without this one
            log.warning("%s: round %d: secure aggregation refused this party's update: %s", self.conn.name,
                        task.round + 1, exc)  # fmt: skip
            outbox.send(Failure(task_id=task.task_id, round=task.round, reason=f"secure aggregation: {exc}"))
            return
        self.send_params(outbox, header, masked)

    def close(self) -> None:
        """Leave the session (the stream and its thread end)."""
        self._stopping.set()
        if self._outbox is not None:
            self._outbox.close()
        if self._channel is not None:
            self._channel.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> SyncParty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, params: FlatParams, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = self._cv.wait_for(self._arrived, left)
                self._raise_error()
                if not ready:
                    said = f" (the arbiter's last notice: {self.notice})" if self.notice else ""
                    raise TimeoutError(f"{self.conn.name}: no global params from the arbiter within {timeout} s{said}")
                if self._fresh is None:  # ended without sending final params (e.g. the arbiter was stopped)
                    return False
                task, self._fresh = self._fresh, None
                self._task = task
                answered = self._answered
                if task.task == TaskKind.SYNC and answered is not None and answered[0] == task.round:
                    if self._outbox is not None:  # a retry of the round answered: the same work, freshly masked
                        log.info("%s: the arbiter runs round %d again; answering it with the same update",
                                 self.conn.name, task.round + 1)  # fmt: skip
                        self._answer(task, params, answered[1], self._outbox)
                    continue
                self._load(params)
                return task.task != TaskKind.FINAL

    # -- where the training loop's params are (a sharded party's rank keeps them in its shards: sharded_party.py)
    def _delta(self, params: FlatParams) -> FlatParams:
        """``params`` minus the round's global params, computed in the receive buffer (which holds the latter)."""
        return self.inbox.mul_(-1.0).add_(params)

    def _load(self, params: FlatParams) -> None:
        params.copy_(self.inbox)

    def _live_params(self) -> FlatParams:
        """What an INIT request is answered with: the training loop's params (the inbox before it gave any)."""
        return self._live if self._live is not None else self.inbox

    def _arrived(self) -> bool:
        """A task whose params are complete (no next one being written into the inbox), the end, or an error."""
        fresh = self._fresh is not None and not self._receiving
        return fresh or self._ended is not None or self._error is not None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the stream thread's side ------------------------------------------------------------------
    def join_message(self) -> Join:
        join = super().join_message()
        join.rounds = self.rounds
        return join

    def on_message(self, msg: object, outbox: Outbox) -> None:
        if self.secure is None or not self.secure.handle(msg, outbox):  # a secure round's stages
            super().on_message(msg, outbox)

    def on_task_header(self, task: Task) -> None:
        with self._cv:
            self._receiving = True

    def on_task(self, task: Task, outbox: object) -> None:
        if task.task == TaskKind.INIT:
            live = self._live_params()
            header = Result(
                task_id=task.task_id,
                round=task.round,
                task=TaskKind.INIT,
                weight=1.0,
                has_params=True,
                is_delta=False,
                spec_digest=self.spec.digest,
                sizes=_sizes(live),
            )
            self.send_params(outbox, header, live)
            return
        with self._cv:
            self._receiving = False
            if task.task in (TaskKind.SYNC, TaskKind.FINAL):
                self._fresh = task
            else:
                log.warning("%s: a sync-mode party cannot do a %s task; ignored", self.conn.name, task.task)
            self._cv.notify_all()

    def on_done(self, reason: str) -> None:
        with self._cv:
            self._ended = reason
            self._cv.notify_all()

    def _closing(self) -> bool:
        return self._stopping.is_set()

    def _wait_before_retry(self, delay: float) -> bool:
        with self._cv:
            self._receiving = False  # a half-received task is void; the arbiter sends the round again
            self._cv.notify_all()
        return self._stopping.wait(delay)

    def _stream(self) -> None:
        try:
            reason = self.run()
        except BaseException as exc:  # handed to the training thread, which raises it
            if self._stopping.is_set():
                reason = "closed"
            else:
                with self._cv:
                    self._error = exc
                    self._cv.notify_all()
                return
        with self._cv:
            if self._ended is None:
                self._ended = reason
            self._cv.notify_all()


@dataclass(frozen=True)
class _Answer:
    """What a sync sent besides the params: kept to answer a retry of its round alike."""

    weight: float
    metrics: dict[str, float]
    stats: TrainStats


def _sizes(params: FlatParams) -> dict[str, int]:
    return {dtype_name(d): b.numel() for d, b in params.buffers.items()}
