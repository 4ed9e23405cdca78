"""The arbiter's gRPC server: who is connected, and what arrives from each party.

Each party holds one bidirectional stream. Its incoming messages are read on a thread of their own, the
outgoing ones are yielded by the gRPC handler from the party's outbox. Results pass the round gate
(``gate.py``) before any buffer is given to them; their params are received into one of at most
``receive_buffers`` buffers (``buffers.py``: server memory is the global model, the running sum and those
buffers, whatever the number of parties), checked, and handed to the round loop as events. What one
party's streams may cost (streams, time to join, messages) is rationed in ``budgets.py``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.vocab import SessionVocabulary
from fedfleet.runtime.grpc.budgets import (
    BAD_MESSAGES_PER_STREAM,
    JOIN_DEADLINE_S,
    STREAMS_PER_PARTY,
    MessageBudget,
    StreamLimits,
)
from fedfleet.runtime.grpc.buffers import ReceiveBuffers, Upload
from fedfleet.runtime.grpc.chunks import ParamsReceiver, layout_json
from fedfleet.runtime.grpc.gate import Refusal, Rejection, RoundGate, check_values
from fedfleet.runtime.grpc.joins import JoinChecks
from fedfleet.runtime.grpc.links import PartyLink
from fedfleet.runtime.grpc.rank_groups import Assembly, MemberLink, RankedStreams, send_params
from fedfleet.runtime.grpc.service import add_handler, server_options
from fedfleet.runtime.grpc.settings import DEFAULTS
from fedfleet.runtime.grpc.tls import peer_identity
from fedfleet.runtime.grpc.wire import (
    Chunk,
    Failure,
    Garbled,
    Heartbeat,
    JoinMode,
    Message,
    Reject,
    Result,
    Welcome,
    WireError,
)

log = logging.getLogger("fedfleet.arbiter")

WARNINGS_PER_PARTY = 50  # logged about one party's bad messages in a session; the rest are only counted


class EventKind(str, Enum):
    """What the arbiter's streams tell the runtime about a party."""

    UPDATE = "update"  # a result whose params passed every check
    EVALUATED = "evaluated"  # an evaluation result (metrics only)
    REJECTED = "rejected"  # its answer for the round is bad (a final refusal): stop waiting for it
    FAILURE = "failure"  # it could not do the task
    GONE = "gone"  # its stream ended
    STAGE = "stage"  # a secure round's stage message that passed the wire's checks (``secure_arbiter.py``)


@dataclass
class Event:
    kind: EventKind
    party: str
    round: int
    result: Result | None = None
    params: FlatParams | None = None  # a receive buffer from the pool: give it back with release()
    reason: str = ""
    stage: Any = None  # STAGE: the secagg message it carries (secagg.messages), attributed to ``party``


class ArbiterServer(RankedStreams, JoinChecks):
    def __init__(
        self,
        *,
        session: str,
        parties: list[str],
        spec: ParamSpec | None,
        address: str,
        credentials: grpc.ServerCredentials | None,
        max_weight: float = DEFAULTS.max_weight,
        max_update_norm: float | None = DEFAULTS.max_update_norm,
        receive_buffers: int = DEFAULTS.receive_buffers,
        upload_stall_s: float = DEFAULTS.upload_stall_s,
        mode: JoinMode = JoinMode.TASKS,
        rank_streams: int = 1,
    ) -> None:
        """``rank_streams``: the most ranks a sharded party may have, each on a stream of its own (``rank_groups``);
        1: every party holds one stream."""
        self.session = session
        self.parties = list(parties)
        self.index = {name: i for i, name in enumerate(self.parties)}
        self.secure = credentials is not None
        self.mode = mode
        self.max_weight = max_weight
        self.max_update_norm = max_update_norm
        self.receive_buffers = receive_buffers
        self.upload_stall_s = upload_stall_s
        self.spec: ParamSpec | None = None
        self.buffers: ReceiveBuffers | None = None  # made when the layout is known
        self._layout_bytes = 0
        self.gate = RoundGate(ParamSpec([]), max_weight)  # replaced when the layout is known
        self.spec_known = threading.Event()
        self.rounds_wanted: dict[str, int] = {}  # sync mode: the number of syncs each party announced
        self.rounds: int | None = None  # sync mode, once fixed: parties announcing another number are refused
        self.refused: dict[str, str] = {}  # parties refused at or after their join (see refuse), and why
        self.vocabulary = SessionVocabulary()  # what token ids mean, fixed by the first party with a tokenizer
        self.events: queue.Queue[Event] = queue.Queue()
        self._warnings: Counter[str] = Counter()  # per party: see _warn
        self._streams = StreamLimits(STREAMS_PER_PARTY * rank_streams)
        self._init_ranks(rank_streams)
        if spec is not None:
            self._adopt(spec)
        self._links: dict[str, PartyLink] = {}
        self._readers: list[threading.Thread] = []
        self._generation = 0
        self.changed = threading.Condition()  # notified when a party joins or leaves
        self.current_round = 0
        # a handler thread per stream: each party's live one and its replacement (budgets.STREAMS_PER_PARTY), per
        # rank of a sharded party, and a few for callers being refused; beyond that a call is refused at once
        # (RESOURCE_EXHAUSTED, retried)
        workers = STREAMS_PER_PARTY * rank_streams * len(self.parties) + 8
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers), options=server_options(), maximum_concurrent_rpcs=workers
        )
        add_handler(self._server, self._connect)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc} (is another arbiter running there?)") from None

    def _adopt(self, spec: ParamSpec) -> None:
        """Fix the session's param layout: from the job's model, or (a model-less arbiter) the first party."""
        self.spec = spec
        self.gate = RoundGate(spec, self.max_weight)
        self.buffers = ReceiveBuffers(spec, self.receive_buffers, self.upload_stall_s)
        self._layout_bytes = len(layout_json(spec))
        self.spec_known.set()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._server.start()
        mode = "mTLS" if self.secure else "insecure"
        log.info("listening on port %d (session %s, %s)", self.port, self.session, mode)

    def stop(self, grace: float = 2.0) -> None:
        """Write what is queued for each party (e.g. the final params and Done), then close, within ``grace``."""
        with self.changed:
            links = list(self._links.values())
        deadline = time.monotonic() + grace
        for link in links:
            link.outbox.drain(max(0.0, deadline - time.monotonic()))
        for link in links:
            link.outbox.close()
        self._server.stop(grace).wait()
        for reader in self._readers:  # let them leave gRPC before the interpreter shuts down
            reader.join(timeout=2.0)

    def connected(self) -> list[str]:
        with self.changed:
            return [name for name in self.parties if name in self._links]

    def link(self, name: str) -> PartyLink | None:
        with self.changed:
            return self._links.get(name)

    def release(self, params: FlatParams | None) -> None:
        """Give a receive buffer back once its update is folded (or discarded)."""
        if params is not None:
            self.buffers.release(params)

    def refuse(self, name: str, reason: str, grace: float = 2.0) -> None:
        """Refuse a connected party after its join (it must not retry): send ``reason`` and close its stream."""
        link = self.link(name)
        if link is None:
            return
        log.warning("refused %s: %s", name, reason)
        with self.changed:
            self.refused[name] = reason  # it will not come back: rounds do not wait for it
        link.outbox.send(Reject(reason=reason))
        link.outbox.drain(grace)
        link.outbox.close()

    def send_params(self, name: str, params: FlatParams, chunk_bytes: int) -> None:
        """``params`` after the task just sent to ``name``: whole, or each rank its boxes of a sharded party."""
        send_params(self.link(name), params, chunk_bytes)

    def _refuse_members(self, name: str, reason: str, joining: PartyLink) -> None:
        """Refuse every connected rank of a sharded party (its ranks' boxes do not fit together); ``joining``'s
        handler tells its own."""
        with self.changed:
            members = [m for m in self._members.pop(name, {}).values() if m is not joining]
            self.refused[name] = reason
            self.changed.notify_all()
        log.warning("refused %s: %s", name, reason)
        for m in members:
            m.outbox.send(Reject(reason=reason))
            m.outbox.drain(2.0)

    def broadcast(self, msg: Message) -> None:
        with self.changed:
            links = list(self._links.values())
        for link in links:
            link.outbox.send(msg)

    # -- one party's stream -------------------------------------------------------------------------
    def _connect(self, requests: Iterator[Message | Garbled], context: grpc.ServicerContext) -> Iterator[Message]:
        certified = peer_identity(context)
        if self.secure:  # refused before a byte of the stream is read: no certificate, or not one of the parties
            reason = self._refuse_identity(certified)
            if reason:
                self._warn(certified or "?", "refused a party (%s): %s", context.peer(), reason)
                yield Reject(reason=reason)
                return
            self._limit_streams(certified, context)
        deadline = threading.Timer(JOIN_DEADLINE_S, context.cancel)  # a stream that never joins is closed
        deadline.daemon = True
        deadline.start()
        try:
            join = next(requests)
        except (StopIteration, grpc.RpcError):
            return
        finally:
            deadline.cancel()
        name, reason = self._identify(join, certified)
        if reason:
            claimed = certified if self.secure else getattr(join, "name", "")
            if claimed in self.index:  # a refused party stops (Reject is final): rounds do not wait for it
                with self.changed:
                    self.refused[claimed] = reason
                    self.changed.notify_all()
            self._warn(claimed or "?", "refused a party (%s): %s", context.peer(), reason)
            yield Reject(reason=reason)
            return
        member = None
        if join.ranks != 1 or join.rank != 0 or join.boxes:  # a rank of a sharded party (perhaps its only one)
            member, reason = self._member(name, join)
            if reason:
                self._warn(name, "refused %s (%s): %s", name, context.peer(), reason)
                yield Reject(reason=reason)
                return
        if not self.secure:
            self._limit_streams(name, context)
        self.rounds_wanted[name] = join.rounds  # before the join is seen: the announced rounds are counted then
        if member is None:
            link = self._attach(name)
        else:
            link, problem = member, self._attach_member(member)
            if problem:
                self._refuse_members(name, problem, member)
                yield Reject(reason=problem)
                return
        context.add_callback(link.outbox.close)
        reader = threading.Thread(target=self._read, args=(link, requests), name=f"read-{name}", daemon=True)
        self._readers = [t for t in self._readers if t.is_alive()] + [reader]
        reader.start()
        yield Welcome(name=name, index=link.index, round=self.current_round)
        yield from link.outbox.frames()

    def _limit_streams(self, identity: str, context: grpc.ServicerContext) -> None:
        self._streams.open(identity, context)
        context.add_callback(lambda: self._streams.close(identity, context))

    def _attach(self, name: str) -> PartyLink:
        with self.changed:
            self.refused.pop(name, None)  # restarted with what it was refused for fixed
            old = self._links.get(name)
            if old is not None:  # a restarted party: the new stream replaces the old one
                old.outbox.close()
            self._generation += 1
            link = PartyLink(name, self.index[name], self._generation)
            self._links[name] = link
            self.changed.notify_all()
        log.info("%s joined%s", name, " (replacing its previous connection)" if old else "")
        return link

    def _detach(self, link: PartyLink, close: bool = True) -> None:
        """``link``'s stream ended (or, ``close`` False, a sharded party lost a rank: its other ranks stay)."""
        if isinstance(link, MemberLink):
            self._detach_member(link)
            return
        with self.changed:
            if self._links.get(link.name) is link:
                del self._links[link.name]
                self.events.put(Event(EventKind.GONE, link.name, self.gate.round))
                log.info("%s left", link.name)
            self.changed.notify_all()
        if close:
            link.outbox.close()

    def _read(self, link: PartyLink, requests: Iterator[Message | Garbled]) -> None:
        state = _Receiving()
        budget = MessageBudget()
        try:
            for msg in requests:
                if isinstance(msg, Garbled):
                    self._warn(link.name, "%s sent an undecodable frame (%s); closing its stream", link.name,
                               msg.reason)  # fmt: skip
                    return
                if not isinstance(msg, Chunk) and not budget.take():
                    self._warn(link.name, "%s sends more than %g messages a second; closing its stream", link.name,
                               budget.rate)  # fmt: skip
                    return
                self._on_message(link, msg, state)
                if state.bad > BAD_MESSAGES_PER_STREAM:
                    self._warn(link.name, "%s sent %d bad messages; closing its stream", link.name, state.bad)
                    return
        except grpc.RpcError:
            pass  # the stream ended: the party left or was killed
        finally:
            self._end_upload(state, "the stream ended")
            self._detach(link)

    def _on_message(self, link: PartyLink, msg: Message, state: _Receiving) -> None:
        if isinstance(msg, Heartbeat):  # keeps idle streams alive through proxies and NATs
            self._check_stall(link, state)
            return
        if isinstance(msg, Chunk):
            self._on_chunk(link, msg, state)
            return
        if state.upload is not None:  # a new message before the last params were complete
            self._end_upload(state, "incomplete")
            self._refuse(link, state.result, Refusal(Rejection.CHUNKS, "params ended before every byte arrived"), state)
        state.discarding = False
        if isinstance(msg, Result) and isinstance(link, MemberLink):
            self._rank_result(link, msg, state)
        elif isinstance(msg, Result):
            refusal = self.gate.admit(link.name, msg)
            if refusal:
                self._refuse(link, msg, refusal, state, counted=True)
                state.discarding = msg.has_params
            elif msg.has_params:
                self._start_upload(link, msg, state)
            else:
                self.events.put(Event(EventKind.EVALUATED, link.name, msg.round, msg))
        elif isinstance(msg, Failure):
            log.warning("%s could not finish round %d: %s", link.name, msg.round + 1, msg.reason)
            self.gate.reject(Rejection.FAILURE)
            self.events.put(Event(EventKind.FAILURE, link.name, msg.round, reason=msg.reason))
        elif not self._on_other(link, msg, state):
            state.bad += 1
            self._warn(link.name, "%s sent an unexpected %s message; ignored", link.name, msg.kind)

    def _on_other(self, link: PartyLink, msg: Message, state: _Receiving) -> bool:
        """A message of a kind this server does not handle itself: True when a subclass took it."""
        return False

    def _start_upload(self, link: PartyLink, result: Result, state: _Receiving) -> None:
        """Wait for a receive buffer (while the round is open and the party connected) for ``result``'s params."""
        upload = self.buffers.start(
            link.name,
            give_up=lambda: not self.gate.accepting(result.round) or link.outbox.closed.is_set(),
            spec=self.gate.upload_spec,  # a secure round's masked inputs have a layout (and a pool) of their own
        )
        if upload is None:
            self._refuse(link, result, Refusal(Rejection.LATE, "the round closed before a receive buffer was free"),
                         state)  # fmt: skip
            state.discarding = True
            return
        state.result, state.upload, state.receiver = result, upload, ParamsReceiver(upload.buffer)

    def _on_chunk(self, link: PartyLink, chunk: Chunk, state: _Receiving) -> None:
        if state.discarding:
            return
        upload, result = state.upload, state.result
        if upload is None:
            state.bad += 1
            self._warn(link.name, "%s sent params without a result header; ignored", link.name)
            return
        with upload.lock:
            refusal = None
            if upload.buffer is None:  # taken back by a party that waited while this upload stood still
                refusal = Refusal(Rejection.STALLED, upload.taken_back)
            elif not self.gate.accepting(result.round):  # the round closed: the rest is of no use
                refusal = Refusal(Rejection.LATE, f"round {result.round + 1} closed before the params arrived")
            else:
                try:
                    state.receiver.add(chunk)
                    upload.touch()
                except WireError as exc:
                    refusal = Refusal(Rejection.CHUNKS, str(exc))
            if refusal is not None:
                self.buffers.abandon(upload, str(refusal))
            complete = refusal is None and state.receiver.complete
            ranked = isinstance(link, MemberLink)
            buffer = self.buffers.finish(upload) if complete and not ranked else None
        if refusal is not None:
            if state.assembly is not None:  # one rank's part is bad: the party's whole update is
                self._void(link.name, state.assembly.task_id, str(refusal), only=state.assembly)
            state.upload = state.receiver = state.assembly = None
            state.discarding = True
            self._refuse(link, result, refusal, state)
            return
        if not complete:
            return
        if ranked:  # one rank's spans: the party's update is complete once all its writers' are
            self._rank_arrived(link, state)
            return
        state.upload = state.receiver = state.result = None
        self._received(link.name, result, buffer, link, state)

    def _received(self, party: str, result: Result, buffer: FlatParams, link: PartyLink, state: _Receiving) -> None:
        """A party's complete params: checked, then handed to the round loop."""
        # masked values look uniformly random: the party checked them before masking (secagg.SecAggParty)
        norm = self.max_update_norm if result.is_delta else None
        masked = buffer.spec == self.gate.upload_spec
        refusal = None if masked else check_values(buffer, float(result.weight), norm)
        if refusal:
            self.release(buffer)
            self._refuse(link, result, refusal, state)
        else:
            self.events.put(Event(EventKind.UPDATE, party, result.round, result, buffer))

    def _check_stall(self, link: PartyLink, state: _Receiving) -> None:
        """An upload that only sends heartbeats loses its buffer once it has stood still for ``upload_stall_s``."""
        upload = state.upload
        if upload is None:
            return
        if not self.gate.accepting(state.result.round):
            refusal = Refusal(Rejection.LATE, f"round {state.result.round + 1} closed before the params arrived")
        elif self.buffers.stall_reason(upload):
            refusal = Refusal(Rejection.STALLED, self.buffers.stall_reason(upload))
        else:
            return
        self._end_upload(state, str(refusal))
        state.discarding = True
        self._refuse(link, state.result, refusal, state)

    def _end_upload(self, state: _Receiving, reason: str) -> None:
        if state.assembly is not None:  # a rank's part broke: the party's whole update with it
            self._void(state.assembly.upload.party, state.assembly.task_id, reason, only=state.assembly)
        elif state.upload is not None:
            with state.upload.lock:
                self.buffers.abandon(state.upload, reason)
        state.upload = state.receiver = state.assembly = None

    def _warn(self, party: str, message: str, *args: object) -> None:
        """A warning about one party's messages, at most ``WARNINGS_PER_PARTY`` of them: a party flooding the
        arbiter with bad messages must not flood its log too (every refusal is still counted per round)."""
        self._warnings[party] += 1
        count = self._warnings[party]
        if count <= WARNINGS_PER_PARTY:
            log.warning(message, *args)
        if count == WARNINGS_PER_PARTY:
            log.warning("%s: %d warnings; more are counted in the rounds' metrics but not logged", party, count)

    def _refuse(
        self, link: PartyLink, result: Result | None, refusal: Refusal, state: _Receiving, counted: bool = False
    ) -> None:
        if not counted:
            self.gate.reject(refusal.kind)
        state.bad += 1
        rnd = result.round if result is not None else -1
        self._warn(link.name, "rejected an update from %s for round %d: %s", link.name, rnd + 1, refusal)
        if refusal.kind.final:
            self.events.put(Event(EventKind.REJECTED, link.name, rnd, result, reason=str(refusal)))


class _Receiving:
    """Per-stream state of the params being received."""

    def __init__(self) -> None:
        self.result: Result | None = None
        self.upload: Upload | None = None
        self.receiver: ParamsReceiver | None = None
        self.assembly: Assembly | None = None  # a sharded party's update this rank's spans fill
        self.discarding = False  # the rest of a refused upload's chunks are dropped unread
        self.bad = 0  # refused or unexpected messages on this stream
