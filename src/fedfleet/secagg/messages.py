"""The messages of one SecAgg+ round, stage by stage. Plain data (str, int, bytes, sets and dicts of them, one
numpy vector) that a runtime serialises as it likes; each names its session, round and sender, and the ones
sent to one party name their receiver, so a message moved to another context is refused.

Stage 1 (advertise): party -> server ``Advertise``; server -> each party its ``Roster``.
Stage 2 (share keys): party -> server a list of ``EncryptedShare``; the server routes them, one inbox per receiver.
Stage 3 (masked input): party -> server ``MaskedInput``.
Stage 4 (unmask): server -> each alive party an ``UnmaskRequest``; party -> server ``UnmaskReply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Advertise:
    """A party's two fresh X25519 public keys (raw, 32 bytes each): one to agree share-encryption keys, one to
    agree pairwise masks."""

    session: str
    round: int
    party: int
    cipher_pk: bytes
    mask_pk: bytes


@dataclass(frozen=True)
class Roster:
    """What the server tells ``party`` after the adverts: every id that advertised (so the party rebuilds the
    graph itself), the graph seed, and the advertised keys of its neighbours in that graph."""

    session: str
    round: int
    party: int
    graph_seed: int
    advertised: tuple[int, ...]
    cipher_pks: dict[int, bytes] = field(default_factory=dict)
    mask_pks: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class EncryptedShare:
    """The sender's shares for the receiver of its self-mask seed and of its mask private key, sealed with
    AES-256-GCM under a key only the two can agree, its AAD binding session, round, sender and receiver."""

    session: str
    round: int
    sender: int
    receiver: int
    ciphertext: bytes


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """The party's quantised, weight-scaled update with the weight in the last element, plus its self mask and
    its pairwise masks: a ring vector (uint32 or uint64) that alone looks uniformly random."""

    session: str
    round: int
    party: int
    data: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's word to ``party`` on the fate of its neighbours: ``alive`` sent masked inputs (the party
    itself among them), ``dropped`` sent shares but no masked input."""

    session: str
    round: int
    party: int
    alive: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskReply:
    """Shares the party holds: of each alive neighbour's self-mask seed, of each dropped one's mask key."""

    session: str
    round: int
    party: int
    self_shares: dict[int, int] = field(default_factory=dict)
    key_shares: dict[int, int] = field(default_factory=dict)
