"""Typed messages between the arbiter and a party, and their one frame format.

Both sides import these classes, so no message name or field is a magic string shared by convention.
A frame is ``u32 header length | JSON header | payload``. Headers are small (at most ``MAX_HEADER_BYTES``);
only chunks (a few MiB of tensor bytes, see ``chunks.py``), a join (the party's param layout, read only
when the arbiter needs it) and secure aggregation's stages (small binary bodies, ``secure_wire.py``) carry a
payload. JSON keeps the headers readable in logs and needs no code
generator; the bytes that matter never go through it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

# bumped when a message changes incompatibly; checked at join (5: notices, the join's vocabulary; 6: secure
# aggregation's stage messages, the join's secure_aggregation, a result's session and secagg_party; 7: a join's
# rank, ranks, boxes and writes, for the ranks of a sharded party)
PROTOCOL = 7
# a header is a few hundred bytes (a result's metrics are at most 64 short names); parsing JSON costs many times
# its size in Python objects, so a longer one is refused before it is parsed
MAX_HEADER_BYTES = 64 << 10

_HEADER_LEN = struct.Struct("<I")
MESSAGES: dict[str, type[Message]] = {}


class WireError(ValueError):
    """A frame that does not decode into a known message (corrupt, or from another protocol version)."""


class TaskKind(str, Enum):
    """What a task asks for (and what a result answers). A ``str`` enum: it is plain text in the header."""

    FIT = "fit"  # train from the params that follow, send the update (server-driven)
    EVALUATE = "evaluate"  # evaluate the params that follow, send metrics
    SYNC = "sync"  # sync mode: start a round from the params that follow; the party's sync answers it
    FINAL = "final"  # sync mode: the last global params; the party's pending sync returns them
    INIT = "init"  # send your initial params (to an arbiter that has no model of its own)


class JoinMode(str, Enum):
    """Who paces a session's rounds: the arbiter (``tasks``) or each party's own training loop (``sync``)."""

    TASKS = "tasks"  # the arbiter sends fit / evaluate tasks
    SYNC = "sync"  # the party calls ctx.sync at its own sync points


Payload = bytes | memoryview | tuple  # a tuple of buffers is joined into the frame (one copy, no pre-join)


@dataclass
class Message:
    kind: ClassVar[str] = ""
    carries_payload: ClassVar[bool] = False  # chunks, joins and secure stages have bytes after the header
    payload: Payload = field(default=b"", repr=False, compare=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.kind:  # a base of several kinds (SecAggMessage), never sent itself
            return
        if cls.kind in MESSAGES:
            raise TypeError(f"message kind {cls.kind!r} is defined twice")
        MESSAGES[cls.kind] = cls


# -- party -> arbiter -------------------------------------------------------------------------------
@dataclass
class Join(Message):
    """The first message of a party's stream. ``name`` is only trusted on an ``--insecure`` arbiter.

    The payload is the party's param layout as JSON ``[[name, shape, dtype], ...]`` (``chunks.describe_spec``):
    an arbiter that has a model compares digests and reads it only to explain a mismatch; a model-less one
    learns the session's layout from it.
    """

    kind: ClassVar[str] = "join"
    carries_payload: ClassVar[bool] = True
    session: str = ""
    spec_digest: str = ""
    protocol: int = PROTOCOL
    name: str = ""
    mode: str = JoinMode.TASKS  # a JoinMode (plain text in the header)
    rounds: int = 0  # sync mode: how many times the party will sync (0 = the arbiter decides)
    vocab: str = ""  # a hash of the party's token ids (``hf.data.vocab_fingerprint``); "" when it has no tokenizer
    secure_aggregation: dict[str, Any] | None = None  # the party's job's SecAggConfig values; None: plain updates
    # a sharded party (FSDP): each of its ``ranks`` holds a stream of its own, carrying only the rows ``boxes``
    # lists: ``[[tensor index in the layout, first row, rows, sends], ...]`` (the rank's compact layout,
    # ``rank_layout.py``); ``sends`` is 1 for the rows it sends (a replicated box is sent by its first holder).
    # Indices, not names: a LLaMA-70B rank's 723 boxes take 15.6 KB of the 64 KiB header (names: 40.6 KB).
    # No boxes: the party's one stream, whole params
    rank: int = 0
    ranks: int = 1
    boxes: list[Any] = field(default_factory=list)


@dataclass
class Result(Message):
    """A party's answer to a task (or a sync); ``params`` chunks follow when ``has_params``."""

    kind: ClassVar[str] = "result"
    task_id: str = ""
    round: int = -1
    task: str = TaskKind.FIT
    weight: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # shown in the arbiter's table
    stats: dict[str, float] = field(default_factory=dict)  # the typed TrainStats (core.update), by field name
    has_params: bool = False
    is_delta: bool = True
    spec_digest: str = ""
    sizes: dict[str, int] = field(default_factory=dict)  # elements per dtype buffer, e.g. {"float32": 1234}
    # a masked input (secure aggregation): the session and the party's id in the round it was masked for
    session: str = ""
    secagg_party: int = 0


@dataclass
class Failure(Message):
    """The party could not do the task (e.g. its local loss diverged); the round goes on without it."""

    kind: ClassVar[str] = "failure"
    task_id: str = ""
    round: int = -1
    reason: str = ""


# -- arbiter -> party -------------------------------------------------------------------------------
@dataclass
class Welcome(Message):
    kind: ClassVar[str] = "welcome"
    name: str = ""
    index: int = -1  # the party's position in the job's party list: its client id for seeds and data
    round: int = 0


@dataclass
class Reject(Message):
    """Sent before the arbiter closes a stream it will not serve; the party must not retry."""

    kind: ClassVar[str] = "reject"
    reason: str = ""


@dataclass
class Task(Message):
    """What the arbiter asks of a party; the global params' chunks follow when ``has_params``.

    ``fit`` / ``evaluate``: train or evaluate from the params (server-driven). Sync mode: ``sync`` starts a
    round from the params (the answer to the party's previous sync), ``final`` carries the last global
    model, ``init`` asks the party for its initial params (an arbiter that has no model of its own).
    """

    kind: ClassVar[str] = "task"
    task_id: str = ""
    round: int = -1
    task: str = TaskKind.FIT
    config: dict[str, Any] = field(default_factory=dict)
    has_params: bool = True


@dataclass
class Done(Message):
    """The session is over: the party exits normally, or with the reason as its error when ``failed``."""

    kind: ClassVar[str] = "done"
    reason: str = ""
    failed: bool = False  # the arbiter gave up (it cannot go on): waiting or redialling would not help


@dataclass
class Notice(Message):
    """Something a waiting party should know (a round waits for a party that left); the party logs it."""

    kind: ClassVar[str] = "notice"
    text: str = ""


# -- secure aggregation's stages (SecAgg+, ``fedfleet.secagg``; the bodies are ``secure_wire``'s) ----------
@dataclass
class SecAggMessage(Message):
    """One stage of a secure round. Each names the round's task, the round, the session and the party's id in the
    round; the arbiter attributes a party's messages by its certificate and refuses one whose names differ
    from what it gave that party (``secure_arbiter.py``). Bulky bodies travel as the payload."""

    carries_payload: ClassVar[bool] = True
    task_id: str = ""
    round: int = -1
    session: str = ""
    party: int = 0  # the party's id in this round: its 1-based position in the round's cohort


@dataclass
class SecAggSetup(SecAggMessage):
    """arbiter -> party: a secure round begins; ``config`` holds the SecAggConfig's values, ``n`` the cohort's size.
    The party checks both against its own job before it draws its keys."""

    kind: ClassVar[str] = "secagg_setup"
    carries_payload: ClassVar[bool] = False
    n: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    graph_seed: int = 0


@dataclass
class SecAggAdvert(SecAggMessage):
    """party -> arbiter: its two fresh X25519 public keys (hex); the payload is its signature and certificate."""

    kind: ClassVar[str] = "secagg_advert"
    cipher_pk: str = ""
    mask_pk: str = ""


@dataclass
class SecAggRoster(SecAggMessage):
    """arbiter -> party: who advertised, and its neighbours' keys (with their signatures and certificates)."""

    kind: ClassVar[str] = "secagg_roster"


@dataclass
class SecAggShares(SecAggMessage):
    """party -> arbiter: its sealed shares, one per neighbour."""

    kind: ClassVar[str] = "secagg_shares"


@dataclass
class SecAggInbox(SecAggMessage):
    """arbiter -> party: the shares its neighbours sealed for it; the fit task follows."""

    kind: ClassVar[str] = "secagg_inbox"


@dataclass
class SecAggUnmask(SecAggMessage):
    """arbiter -> party: which of its neighbours sent masked inputs (alive) and which did not (dropped)."""

    kind: ClassVar[str] = "secagg_unmask"


@dataclass
class SecAggReply(SecAggMessage):
    """party -> arbiter: its shares of the alive neighbours' self-mask seeds and the dropped ones' mask keys."""

    kind: ClassVar[str] = "secagg_reply"


# -- both ways --------------------------------------------------------------------------------------
@dataclass
class Heartbeat(Message):
    kind: ClassVar[str] = "heartbeat"


@dataclass
class Chunk(Message):
    """A slice of one dtype buffer of the params being sent; the payload is a safetensors blob."""

    kind: ClassVar[str] = "chunk"
    carries_payload: ClassVar[bool] = True


@dataclass(frozen=True)
class Garbled:
    """What a frame that does not decode becomes on the receiving side (never sent, not a message kind).

    gRPC's own handling of a deserializer that raises aborts the call from inside its machinery (an arbiter
    then hung in shutdown); as a value, a garbled frame is handled like any other bad message: it costs the
    stream that sent it.
    """

    reason: str


def encode(msg: Message) -> bytes:
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "payload"}
    header = json.dumps({"t": msg.kind, **fields}, separators=(",", ":")).encode()
    parts = msg.payload if isinstance(msg.payload, tuple) else (msg.payload,)
    return b"".join((_HEADER_LEN.pack(len(header)), header, *parts))


def decode(frame: bytes) -> Message:
    view = memoryview(frame)
    if len(view) < _HEADER_LEN.size:
        raise WireError(f"frame of {len(view)} bytes is too short")
    (n,) = _HEADER_LEN.unpack_from(view)
    if n > MAX_HEADER_BYTES or _HEADER_LEN.size + n > len(view):
        raise WireError(f"a header of {n} bytes in a frame of {len(view)} (headers are at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(bytes(view[_HEADER_LEN.size : _HEADER_LEN.size + n]))
        cls = MESSAGES[header.pop("t")]
        payload = view[_HEADER_LEN.size + n :]
        if payload.nbytes and not cls.carries_payload:
            raise ValueError(f"a {cls.kind} message carries no payload, got {payload.nbytes} bytes")
        return cls(payload=payload, **header)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"undecodable frame: {exc}") from None


def decode_or_garbled(frame: bytes) -> Message | Garbled:
    """``decode`` for gRPC's deserializer hook: a bad frame becomes a :class:`Garbled` value, not an exception."""
    try:
        return decode(frame)
    except WireError as exc:
        return Garbled(str(exc))
