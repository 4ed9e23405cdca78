"""The arbiter's side of a sharded party: each of its ranks on a stream of its own, one party to the rounds.

A rank of an FSDP party joins with ``ranks`` > 1 and the boxes it holds (``rank_layout.py``). Its stream is a
*member*; once every rank of the party is connected and the writers' boxes cover the session's params exactly
once, the members form one ``RankedLink`` that stands for the party everywhere a link does (rounds wait for it,
a task sent to it reaches every rank, a member's stream ending ends it). Global params sent to it go to each rank
cut to its own boxes; no rank receives, and no rank sends, another's part.

A round's update of the party is *assembled*: rank 0's result (weight, metrics) passes the round gate as any
party's; every writing rank's result is checked against the task the party was given; all of them fill one
receive buffer, each rank its own spans; when the last span has arrived the buffer is checked and folded as one
update. A rank whose part does not arrive costs the party its update, as a party whose upload breaks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedfleet.core.params import FlatParams
from fedfleet.runtime.grpc.buffers import Upload
from fedfleet.runtime.grpc.chunks import dtype_name, iter_chunks
from fedfleet.runtime.grpc.gate import Refusal, Rejection
from fedfleet.runtime.grpc.links import PartyLink
from fedfleet.runtime.grpc.rank_layout import LayoutReceiver, RankLayout, iter_layout_chunks, tiles, wire_boxes
from fedfleet.runtime.grpc.wire import Join, JoinMode, Message, Result

if TYPE_CHECKING:
    from fedfleet.runtime.grpc.arbiter import ArbiterServer, _Receiving

log = logging.getLogger("fedfleet.arbiter")

SETTLED_KEPT = 8  # tasks per party remembered as done: a party is sent one task a round


class MemberLink(PartyLink):
    """One rank's stream of a sharded party."""

    def __init__(
        self, name: str, index: int, generation: int, join: Join, layout: RankLayout, write_layout: RankLayout
    ) -> None:
        """``layout``: the boxes the rank holds (and receives); ``write_layout``: those it sends."""
        super().__init__(name, index, generation)
        self.rank, self.ranks, self.layout, self.write_layout = join.rank, join.ranks, layout, write_layout
        self.writes = bool(write_layout.boxes)


class _FanOut:
    """The outbox of a whole party: a message goes to every rank's stream; closed when any of them is."""

    def __init__(self, members: list[MemberLink]) -> None:
        self.members = members
        self.closed = self

    def send(self, item: Message) -> None:
        for m in self.members:
            m.outbox.send(item)

    def close(self) -> None:
        for m in self.members:
            m.outbox.close()

    def drain(self, timeout: float) -> bool:
        return all([m.outbox.drain(timeout) for m in self.members])

    def is_set(self) -> bool:
        return any(m.outbox.closed.is_set() for m in self.members)


class RankedLink(PartyLink):
    """A sharded party's streams as one link (its index and name are the party's)."""

    def __init__(self, name: str, index: int, generation: int, members: dict[int, MemberLink]) -> None:
        super().__init__(name, index, generation)
        self.members = members
        self.outbox = _FanOut([members[r] for r in sorted(members)])  # type: ignore[assignment]
        self.writers = frozenset(r for r, m in members.items() if m.writes)


@dataclass
class Assembly:
    """One update of a sharded party being received from its writing ranks into one buffer."""

    task_id: str
    upload: Upload
    waiting: set[int]  # the writing ranks whose spans have not all arrived
    answered: set[int] = field(default_factory=set)  # the ranks whose result came: a second one is refused
    result: Result | None = None  # rank 0's, once the gate admitted it
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_params(link: PartyLink | None, params: FlatParams, chunk_bytes: int) -> None:
    """``params`` to a party: whole on a plain link, each rank's own boxes on a sharded party's."""
    if link is None:
        return
    if isinstance(link, RankedLink):
        for member in link.members.values():
            member.outbox.send(iter_layout_chunks(params, member.layout, chunk_bytes))
    else:
        link.outbox.send(iter_chunks(params, chunk_bytes))


class RankedStreams:
    """What ``ArbiterServer`` does with the members of sharded parties (mixed into it)."""

    def _init_ranks(self: ArbiterServer, rank_streams: int) -> None:
        self.rank_streams = rank_streams  # the most ranks a sharded party may have
        self._members: dict[str, dict[int, MemberLink]] = {}
        self._assemblies: dict[str, Assembly] = {}
        # each sharded party's last few tasks whose update is complete or void: a late part must not start another
        self._settled: dict[str, deque[str]] = {}
        self._assembling = threading.Lock()  # guards the dicts above; never held while waiting for a buffer
        self._starting: dict[str, threading.Lock] = {}  # per party: one of its ranks starts its assembly at a time

    def _member(self: ArbiterServer, name: str, join: Join) -> tuple[MemberLink | None, str]:
        """The new member stream of ``name``'s rank ``join.rank`` (None and why not, for a bad join)."""
        if not (type(join.ranks) is int and type(join.rank) is int and 0 <= join.rank < join.ranks):
            return None, f"rank {join.rank!r} of {join.ranks!r} ranks"
        if self.mode != JoinMode.SYNC:
            return None, f"{name} is a sharded party: its ranks sync on their own schedule (a party-paced session)"
        if join.secure_aggregation is not None:
            return None, "secure aggregation masks a party's whole update on one stream: exchange='gathered'"
        if join.ranks > self.rank_streams:
            return None, (
                f"{name} has {join.ranks} ranks, each exchanging its own shard; this arbiter allows "
                f"{self.rank_streams} (rank_streams), or start the party with exchange='gathered'"
            )
        try:
            boxes, sent = wire_boxes(self.spec, join.boxes)
            layout, write_layout = RankLayout(self.spec, boxes), RankLayout(self.spec, sent)
        except (TypeError, ValueError) as exc:
            return None, f"{name} rank {join.rank}: {exc}"
        with self.changed:
            self._generation += 1
            return MemberLink(name, self.index[name], self._generation, join, layout, write_layout), ""

    def _attach_member(self: ArbiterServer, member: MemberLink) -> str:
        """Add ``member`` to its party; once every rank is there the party is connected. '' or why it is refused."""
        name = member.name
        with self.changed:
            group = self._members.setdefault(name, {})
            stale = [m for m in group.values() if m.ranks != member.ranks] + [group.get(member.rank)]
            for old in stale:  # a restarted rank (or the party restarted with another world size) replaces it
                if old is not None:
                    group.pop(old.rank, None)
                    old.outbox.close()
            group[member.rank] = member
            current = self._links.get(name)
            if current is not None:  # a rank came back: the party as it was is gone (and its round's task)
                self._detach(current, close=False)
            if len(group) < member.ranks:
                self.changed.notify_all()
                return ""
            problem = tiles(self.spec, [m.write_layout for m in group.values()])
            if problem:
                return f"{name}'s ranks do not hold the session's params between them: {problem}"
            self.refused.pop(name, None)
            self._generation += 1
            self._links[name] = RankedLink(name, self.index[name], self._generation, dict(group))
            self.changed.notify_all()
        log.info("%s joined: %d ranks, each exchanging its own shard", name, member.ranks)
        return ""

    def _detach_member(self: ArbiterServer, member: MemberLink) -> None:
        with self.changed:
            group = self._members.get(member.name, {})
            if group.get(member.rank) is member:
                del group[member.rank]
            link = self._links.get(member.name)
            if isinstance(link, RankedLink) and link.members.get(member.rank) is member:
                self._detach(link, close=False)  # the other ranks wait for this one to come back
        member.outbox.close()

    def _rank_result(self: ArbiterServer, member: MemberLink, msg: Result, state: _Receiving) -> None:
        """A rank's result: admit it (rank 0's through the gate), then receive its spans into the party's buffer."""
        link = self.link(member.name)
        if not isinstance(link, RankedLink) or link.members.get(member.rank) is not member:
            state.discarding = msg.has_params  # a stream that is no longer one of the party's
            return
        refusal = self._rank_refusal(member, msg)
        if refusal is None and member.rank == 0:
            global_sizes = {dtype_name(d): n for d, n in self.spec.sizes.items()}
            refusal = self.gate.admit(member.name, dataclasses.replace(msg, spec_digest=self.spec.digest,
                                                                        sizes=global_sizes))  # fmt: skip
            counted = True
        elif refusal is None:
            refusal, counted = self.gate.expects(member.name, msg), False
        else:
            counted = False
        if refusal is not None:
            self._refuse(member, msg, refusal, state, counted=counted)
            state.discarding = msg.has_params
            if member.rank == 0 or refusal.kind.final:
                self._void(member.name, msg.task_id, str(refusal))
            return
        if msg.task_id in self._settled.get(member.name, ()):  # it would start an update that can never complete
            refusal = Refusal(Rejection.DUPLICATE, "the party's update for this task is complete, or was refused")
            self._refuse(member, msg, refusal, state)
            state.discarding = True
            return
        assembly = self._assembly(link, msg)
        if assembly is None:
            self._refuse(member, msg, Refusal(Rejection.LATE, "the round closed before a receive buffer was free"),
                         state)  # fmt: skip
            state.discarding = True
            return
        with assembly.lock:
            again = member.rank in assembly.answered
            assembly.answered.add(member.rank)
            if member.rank == 0 and not again:
                assembly.result = msg
        buffer = assembly.upload.buffer
        refusal = Refusal(Rejection.DUPLICATE, f"rank {member.rank} already answered") if again else None
        if buffer is None:  # taken back: another rank's part was refused, or stalled
            refusal = Refusal(Rejection.STALLED, assembly.upload.taken_back or "the party's update was given up")
        if refusal is not None:  # a second answer must not replace the rows of the first
            self._refuse(member, msg, refusal, state)
            state.discarding = True
            return
        receiver = LayoutReceiver(buffer, member.write_layout)
        state.result, state.upload, state.receiver, state.assembly = msg, assembly.upload, receiver, assembly
        if receiver.complete:  # a rank holding nothing of the writers' share
            self._rank_arrived(member, state)

    def _rank_refusal(self: ArbiterServer, member: MemberLink, msg: Result) -> Refusal | None:
        if not member.writes:  # a replica's boxes are sent by their first holder
            return Refusal(Rejection.LAYOUT, f"rank {member.rank} joined as holding no boxes it sends")
        sizes = {dtype_name(d): n for d, n in member.write_layout.compact.sizes.items()}
        if not msg.has_params or msg.spec_digest != member.write_layout.compact.digest or msg.sizes != sizes:
            return Refusal(Rejection.LAYOUT, f"rank {member.rank}'s params {msg.sizes} are not its boxes' {sizes}")
        return None

    def _assembly(self: ArbiterServer, link: RankedLink, msg: Result) -> Assembly | None:
        """The party's assembly for ``msg``'s task, started by whichever rank's result comes first."""
        with self._assembling:
            starting = self._starting.setdefault(link.name, threading.Lock())
        with starting:  # the party's other ranks wait here for the same buffer (no other party does)
            with self._assembling:
                assembly = self._assemblies.get(link.name)
                if assembly is not None and assembly.task_id == msg.task_id:
                    return assembly
                if assembly is not None:
                    self._drop_assembly(link.name, "a newer task began", locked=True)
            upload = self.buffers.start(
                link.name,
                give_up=lambda: not self.gate.accepting(msg.round) or link.outbox.closed.is_set(),
                spec=self.gate.upload_spec,
            )
            if upload is None:
                return None
            assembly = Assembly(msg.task_id, upload, set(link.writers))
            with self._assembling:
                self._assemblies[link.name] = assembly
            return assembly

    def _rank_arrived(self: ArbiterServer, member: MemberLink, state: _Receiving) -> None:
        """``member``'s part is in: the party's update is ready once every writer's is and rank 0's result."""
        assembly = state.assembly
        state.upload = state.receiver = state.result = state.assembly = None
        with assembly.lock:
            assembly.waiting.discard(member.rank)
            ready = not assembly.waiting and assembly.result is not None
            if ready:
                assembly.waiting.add(-1)  # done: a second call finds it taken
        if not ready:
            return
        with self._assembling:
            if self._assemblies.get(member.name) is assembly:
                del self._assemblies[member.name]
            self._settle(member.name, assembly.task_id)
        with assembly.upload.lock:
            buffer = self.buffers.finish(assembly.upload)
        if buffer is None:
            self._refuse(member, assembly.result, Refusal(Rejection.STALLED, assembly.upload.taken_back), state)
            return
        self._received(member.name, assembly.result, buffer, member, state)

    def _void(self: ArbiterServer, name: str, task_id: str, reason: str, only: Assembly | None = None) -> None:
        """``name``'s update for ``task_id`` will not be folded: its buffer goes back, later parts are refused."""
        with self._assembling:
            self._settle(name, task_id)
            current = self._assemblies.get(name)
            if current is not None and current.task_id == task_id:  # a stale task's refusal leaves the current one
                self._drop_assembly(name, reason, locked=True, only=only)

    def _settle(self: ArbiterServer, name: str, task_id: str) -> None:
        """Remember ``task_id`` as done for ``name`` (the caller holds ``_assembling``)."""
        self._settled.setdefault(name, deque(maxlen=SETTLED_KEPT)).append(task_id)

    def _drop_assembly(
        self: ArbiterServer, name: str, reason: str, locked: bool = False, only: Assembly | None = None
    ) -> None:
        """Give up ``name``'s update being assembled (``only``: if it is still that one); its buffer goes back."""

        def drop() -> None:
            assembly = self._assemblies.get(name)
            if assembly is None or (only is not None and assembly is not only):
                return
            del self._assemblies[name]
            with assembly.upload.lock:
                self.buffers.abandon(assembly.upload, reason)

        if locked:
            drop()
            return
        with self._assembling:
            drop()
