"""A data-owner party: dials the arbiter, runs the tasks it is sent, reconnects after any failure.

The party opens the stream (it needs no inbound port), joins the session, and then answers tasks:
``fit`` trains its trainer from the params that follow and sends back the update in chunks; ``evaluate``
sends back metrics. A broken stream (the arbiter restarted, the network dropped) is retried with
exponential backoff and jitter until the arbiter has been out of reach for ``give_up_s`` (10 minutes by
default: a restarted arbiter is back well within that, a dead one is not waited for all day); a refusal (wrong
session, unknown certificate) is not retried at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.errors import TrainingDivergedError, UserError
from fedfleet.runtime.grpc import handshake
from fedfleet.runtime.grpc.backoff import backoff_delays
from fedfleet.runtime.grpc.chunks import DEFAULT_CHUNK_BYTES, ParamsReceiver, dtype_name, iter_chunks, layout_json
from fedfleet.runtime.grpc.links import Outbox
from fedfleet.runtime.grpc.secure_wire import config_values
from fedfleet.runtime.grpc.service import channel_options, connect_stub
from fedfleet.runtime.grpc.tls import ARBITER_CHANNEL_OPTIONS
from fedfleet.runtime.grpc.wire import (
    Chunk,
    Done,
    Failure,
    Garbled,
    Heartbeat,
    Join,
    JoinMode,
    Notice,
    Reject,
    Result,
    Task,
    TaskKind,
    Welcome,
    WireError,
)
from fedfleet.secagg.errors import SecAggRefused

if TYPE_CHECKING:
    from fedfleet.runtime.grpc.secure_party import SecureStages

log = logging.getLogger("fedfleet.party")


class PartyRejected(UserError):
    """The arbiter refused this party; retrying would not help."""


class SessionFailed(UserError):
    """The arbiter ended the session because it cannot go on (a party missing, a bad layout ...)."""


@dataclass
class Connection:
    """Where and as whom a party connects."""

    address: str
    session: str
    name: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext (--insecure)
    heartbeat_s: float = 5.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_attempts: int | None = None  # consecutive failed connection attempts before giving up; None = no limit
    reconnect_max_s: float = 30.0
    give_up_s: float | None = 600.0  # seconds without reaching the arbiter before giving up; None = forever

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=channel_options())
        # whatever address is dialled (an IP on an HPC node, a hostname), only a certificate of the job's CA valid
        # for the name "arbiter" passes the handshake: another party's certificate cannot pose as the arbiter
        options = [*channel_options(), *ARBITER_CHANNEL_OPTIONS]
        return grpc.secure_channel(self.address, self.credentials, options=options)


class PartySession:
    """One party's stream to the arbiter: join, receive tasks and their params, reconnect after failures.

    Subclasses say what a task means (``on_task``): :class:`Party` trains when told to, a
    :class:`~fedfleet.runtime.grpc.sync_party.SyncParty` hands the params to a training loop of its own.
    """

    mode = JoinMode.TASKS

    def __init__(self, spec: Any, connection: Connection) -> None:
        self.conn = connection
        self.spec = spec
        self.inbox = FlatParams.zeros(spec)  # the global params arrive here, one buffer for every task
        self.index = -1
        self.vocab = ""  # the fingerprint of the party's token ids, sent in the join ("" = no tokenizer)
        self.notice = ""  # the arbiter's last notice (what the session waits for)
        self.secure_aggregation: dict | None = None  # the job's secure-aggregation settings, told at join
        self._outbox: Outbox | None = None
        self._channel: grpc.Channel | None = None
        self.bytes_received = 0  # params bytes of the arbiter's chunks (the frames' payloads)
        self.bytes_sent = 0  # params bytes of this party's chunks, as they are written

    def join_message(self) -> Join:
        return Join(
            session=self.conn.session,
            spec_digest=self.spec.digest,
            name=self.conn.name,
            mode=self.mode,
            vocab=self.vocab,
            secure_aggregation=self.secure_aggregation,
            payload=layout_json(self.spec),
        )

    def on_task(self, task: Task, outbox: Outbox) -> None:
        """A task has arrived, with its params in ``self.inbox`` when it has any."""
        raise NotImplementedError

    def on_task_header(self, task: Task) -> None:
        """A task's params start arriving into ``self.inbox`` (``on_task`` follows when they are complete)."""

    def on_done(self, reason: str) -> None:
        """The arbiter ended the session."""

    def on_message(self, msg: object, outbox: Outbox) -> None:
        """A message the stream does not handle itself (a secure round's stages); ignored by default."""
        log.debug("%s: ignored a %s message", self.conn.name, getattr(msg, "kind", type(msg).__name__))

    def run(self) -> str:
        """Serve until the arbiter says the session is done; returns its reason."""
        delays = backoff_delays(cap=self.conn.reconnect_max_s)
        failures = closed = 0
        lost_at: float | None = None  # when the arbiter was last seen going away (reset by a welcome)
        while True:
            try:
                return self._serve()
            except _StreamBroken as exc:
                if self._closing():  # this side closed the stream: nothing was lost, nothing to redial
                    return "stopped"
                closed = closed + 1 if exc.closed_at_handshake else 0
                if closed >= handshake.CLOSED_STREAK:
                    exc.problem = handshake.closed_streak_problem(closed)
                if exc.problem:  # the certificates or the transport do not match: redialling would not help
                    problem = f"cannot reach the arbiter at {self.conn.address}: {exc.problem}"
                    raise handshake.HandshakeFailed(problem) from None
                if exc.welcomed or lost_at is None:  # it was up: start the backoff (and the clock) from the bottom
                    delays, failures, lost_at = backoff_delays(cap=self.conn.reconnect_max_s), 0, time.monotonic()
                failures += 1
                if self.conn.max_attempts is not None and failures >= self.conn.max_attempts:
                    raise ConnectionError(f"cannot reach the arbiter at {self.conn.address}: {exc}") from None
                delay = next(delays)
                if self.conn.give_up_s is not None:
                    left = self.conn.give_up_s - (time.monotonic() - lost_at)
                    if left <= 0:
                        raise ConnectionError(
                            f"the arbiter at {self.conn.address} has been out of reach for {self.conn.give_up_s:g} s "
                            f"(the party's give-up time; last: {exc}): is it running at that address?"
                        ) from None
                    delay = min(delay, left)
                log.warning("%s: %s; reconnecting in %.1f s", self.conn.name, exc, delay)
                if self._wait_before_retry(delay):
                    return "stopped"

    def _closing(self) -> bool:
        """Whether this party is closing its own stream (a SyncParty's ``close``)."""
        return False

    def _wait_before_retry(self, delay: float) -> bool:
        """Sleep before reconnecting; True ends the party instead (a SyncParty being closed)."""
        threading.Event().wait(delay)
        return False

    def _serve(self) -> str:
        outbox = Outbox()
        outbox.send(self.join_message())
        beat = threading.Thread(target=self._heartbeat, args=(outbox,), daemon=True)
        welcomed = False
        channel = self.conn.channel()
        self._outbox, self._channel = outbox, channel
        try:
            stream = connect_stub(channel)(outbox.frames())
            beat.start()
            receiver: ParamsReceiver | None = None
            task: Task | None = None
            for msg in stream:
                if isinstance(msg, Garbled):
                    raise WireError(msg.reason)
                if isinstance(msg, Welcome):
                    welcomed, self.index = True, msg.index
                    log.info("%s joined session %s as party %d", self.conn.name, self.conn.session, msg.index)
                elif isinstance(msg, Reject):
                    raise PartyRejected(f"the arbiter refused {self.conn.name}: {msg.reason}")
                elif isinstance(msg, Notice):
                    self.notice = msg.text[:1000]
                    log.warning("%s: the arbiter says: %s", self.conn.name, self.notice)
                elif isinstance(msg, Done) and msg.failed:
                    raise SessionFailed(f"the arbiter ended session {self.conn.session}: {msg.reason}")
                elif isinstance(msg, Done):
                    log.info("%s: %s", self.conn.name, msg.reason)
                    self.on_done(msg.reason)
                    return msg.reason
                elif isinstance(msg, Task) and not msg.has_params:
                    self.on_task(msg, outbox)
                elif isinstance(msg, Task):
                    self.on_task_header(msg)
                    task, receiver = msg, ParamsReceiver(self.inbox)
                    if receiver.complete:  # params of no elements (a rank holding nothing): no chunk comes
                        self.on_task(task, outbox)
                        task = receiver = None
                elif isinstance(msg, Chunk) and receiver is not None and task is not None:
                    receiver.add(msg)
                    self.bytes_received += len(msg.payload)
                    if receiver.complete:
                        self.on_task(task, outbox)
                        task = receiver = None
                else:
                    self.on_message(msg, outbox)
            raise _StreamBroken("the arbiter closed the stream", welcomed)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            raise _StreamBroken(
                f"connection lost ({exc.code().name}: {details})",
                welcomed,
                problem=handshake.fatal_problem(details),
                closed_at_handshake=not welcomed and handshake.CLOSED in details,
            ) from None
        except WireError as exc:
            raise _StreamBroken(f"garbled message from the arbiter ({exc})", welcomed) from None
        finally:
            outbox.close()
            channel.close()
            if beat.is_alive():
                beat.join(timeout=2.0)

    def _heartbeat(self, outbox: Outbox) -> None:
        while not outbox.closed.wait(self.conn.heartbeat_s):
            outbox.send(Heartbeat())

    def send_params(self, outbox: Outbox, header: Result, params: FlatParams) -> None:
        outbox.send(header)
        outbox.send(self._counted(iter_chunks(params, self.conn.chunk_bytes)))

    def _counted(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            payload = chunk.payload
            self.bytes_sent += _joined(payload) if isinstance(payload, tuple) else memoryview(payload).nbytes
            yield chunk


def _joined(parts: tuple) -> int:
    return sum(memoryview(p).nbytes for p in parts)


class Party(PartySession):
    """Runs ``trainer`` when the arbiter says so. ``train_data`` / ``eval_data`` are the party's own data.
    ``secure``: the job has secure aggregation, and this party masks its updates (``secure_party.py``)."""

    def __init__(
        self,
        trainer: Any,
        train_data: Any,
        eval_data: Any,
        connection: Connection,
        report: Callable[[str], None] | None = None,
        secure: SecureStages | None = None,
    ) -> None:
        super().__init__(trainer.params.spec, connection)
        self.trainer = trainer
        self.train_data = train_data
        self.eval_data = eval_data if eval_data is not None else train_data
        self.report = report or (lambda line: None)  # one line per task, for whoever watches the party
        self.secure = secure
        if secure is not None:
            self.secure_aggregation = config_values(secure.config)

    def on_task(self, task: Task, outbox: Outbox) -> None:
        self._run(task, outbox)

    def on_message(self, msg: object, outbox: Outbox) -> None:
        if self.secure is None or not self.secure.handle(msg, outbox):
            super().on_message(msg, outbox)

    def _run(self, task: Task, outbox: Outbox) -> None:
        if task.task == TaskKind.INIT:  # an arbiter without the data asks for the seeded initial model
            header = self.result_header(task, 1.0, {}, self.trainer.params, is_delta=False)
            self.send_params(outbox, header, self.trainer.params)
            self.report("sent the initial model")
            return
        if task.task == TaskKind.EVALUATE:
            metrics = self.trainer.evaluate(self.inbox, self.eval_data)
            weight = float(max(1, len(self.eval_data.y)))  # the mean over parties weighs each by its examples
            outbox.send(
                Result(task_id=task.task_id, round=task.round, task=TaskKind.EVALUATE, weight=weight, metrics=metrics)
            )
            return
        if self.secure is not None and not self.secure.ready(task):  # never a plain update, never trained in vain
            reason = "this party's job has secure aggregation: it answers only the fit task of a secure round"
            outbox.send(Failure(task_id=task.task_id, round=task.round, reason=reason))
            return
        config = FitConfig(**task.config)
        self.report(f"round {task.round + 1}: training")
        try:
            update = self.trainer.fit(self.inbox, config, self.train_data)
        except TrainingDivergedError as exc:
            self.report(f"round {task.round + 1}: training diverged ({exc})")
            outbox.send(Failure(task_id=task.task_id, round=task.round, reason=str(exc)))
            return
        if self.secure is not None:
            try:
                header, params = self.secure.mask(task, update)
            except (SecAggRefused, ValueError) as exc:  # NaN or inf, or an inbox that does not verify
                self.report(f"round {task.round + 1}: secure aggregation refused the update ({exc})")
                outbox.send(Failure(task_id=task.task_id, round=task.round, reason=f"secure aggregation: {exc}"))
                return
        else:
            header = self.result_header(task, update.weight, update.metrics, update.params, update.is_delta)
            header.stats, params = update.stats.to_wire(), update.params
        self.send_params(outbox, header, params)
        loss = update.stats.loss
        tail = f", train loss {loss:.4f}" if loss is not None else ""
        self.report(f"round {task.round + 1}: sent the update of {update.weight:g} examples{tail}")

    @staticmethod
    def result_header(task: Task, weight: float, metrics: dict, params: FlatParams, is_delta: bool = True) -> Result:
        return Result(
            task_id=task.task_id,
            round=task.round,
            task=task.task,
            weight=float(weight),
            metrics={k: float(v) for k, v in metrics.items()},
            has_params=True,
            is_delta=is_delta,
            spec_digest=params.spec.digest,
            sizes={dtype_name(d): b.numel() for d, b in params.buffers.items()},
        )


class _StreamBroken(Exception):
    def __init__(self, message: str, welcomed: bool, problem: str = "", closed_at_handshake: bool = False) -> None:
        super().__init__(message)
        self.welcomed = welcomed
        self.problem = problem  # a handshake failure that will repeat (handshake.FATAL)
        self.closed_at_handshake = closed_at_handshake
