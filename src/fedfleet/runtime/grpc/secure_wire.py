"""The bodies of secure aggregation's stage messages, and the layout of a masked input on the wire.

Rosters, shares, unmask requests and replies travel as the payload of their message (``wire.SecAgg*``) in a
small binary format of fixed-size records: big-endian ``u32`` counts and ids, raw 32-byte X25519 keys, 160-byte
sealed shares, 66-byte field elements. Nothing in it is executable and nothing allocates more than the bytes
it arrived in. Every decoder is given the bound its round allows (the cohort ``n``, the share graph's
``degree``) and refuses a payload longer than that before it reads a byte of it; any malformed body is a
``WireError``, which costs only its sender.

A masked input is a ring vector (uint32, or uint64 for a 64-bit ring) of numel + 1 elements (the weight last).
It travels as ordinary params chunks of a one-tensor layout (``masked_spec``) of int32 (int64): the same bytes,
since the chunks carry any integer buffer bit for bit, so the receive path, its gate and its buffers are the
ones plain updates use.
"""

from __future__ import annotations

import dataclasses
import struct
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.runtime.grpc.wire import WireError
from fedfleet.secagg.config import SecAggConfig
from fedfleet.secagg.crypto import KEY_BYTES
from fedfleet.secagg.messages import EncryptedShare, Roster, UnmaskReply, UnmaskRequest
from fedfleet.secagg.shamir import SHARE_BYTES

MASKED_NAME = "secagg.masked"
SEALED_BYTES = 12 + 2 * SHARE_BYTES + 16  # AES-GCM nonce, the two Shamir shares, the tag
MAX_SIGNATURE_BYTES = 80  # an ECDSA P-256 signature in DER is at most 72 bytes
MAX_CERTIFICATE_BYTES = 4096  # a party's DER certificate from `fedfleet certs` is about 500 bytes
SELF, KEY = 0, 1  # the kind of a share in an unmask reply

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_SHARE = struct.Struct(f">I{SEALED_BYTES}s")  # peer id, sealed share
_REPLY = struct.Struct(f">BI{SHARE_BYTES}s")  # kind, peer id, field element
_NEIGHBOUR = struct.Struct(f">I{KEY_BYTES}s{KEY_BYTES}s")  # id, cipher key, mask key (then the signed part)


def config_values(config: SecAggConfig | None) -> dict[str, Any] | None:
    """A job's secure-aggregation settings as a join and a setup carry them (None: plain updates)."""
    return None if config is None else dataclasses.asdict(config)


def masked_spec(numel: int, ring_bits: int) -> ParamSpec:
    """The one-tensor layout a masked input of ``numel`` params (plus the weight) travels in."""
    return ParamSpec([(MASKED_NAME, (numel + 1,), torch.int32 if ring_bits == 32 else torch.int64)])


def lend(data: np.ndarray) -> tuple[FlatParams, weakref.ref]:
    """A ring vector (uint32 / uint64) as the params of its ``masked_spec`` (a view, no copy), and a weak
    reference that is dead once nothing made from those params can read ``data`` any more: the tensor's
    storage, which every view and upload chunk of it holds, holds the array the tensor was made from, and only
    it does."""
    signed = data.view(np.int32 if data.dtype == np.uint32 else np.int64)
    tensor = torch.from_numpy(signed)
    # the tensor is the buffer itself (from_tensors would copy the masked model into a new zeroed buffer)
    return FlatParams(ParamSpec.of({MASKED_NAME: tensor}), {tensor.dtype: tensor}), weakref.ref(signed)


def ring_vector(params: FlatParams) -> np.ndarray:
    """The received masked params as the ring vector they are: a view, no copy."""
    (buffer,) = params.buffers.values()
    signed = buffer.numpy()
    return signed.view(np.uint32 if signed.dtype == np.int32 else np.uint64)


@dataclass(frozen=True)
class Signed:
    """What binds an advert's keys to a certificate: the party's ECDSA signature and its DER certificate (both
    empty on an ``--insecure`` session, where identities are taken on trust)."""

    signature: bytes = b""
    certificate: bytes = b""


# -- adverts' signed part ---------------------------------------------------------------------------
def encode_signed(signed: Signed) -> bytes:
    if len(signed.signature) > MAX_SIGNATURE_BYTES or len(signed.certificate) > MAX_CERTIFICATE_BYTES:
        raise ValueError("a signature or certificate beyond the wire's bounds")
    return b"".join((_U16.pack(len(signed.signature)), signed.signature, _U16.pack(len(signed.certificate)),
                     signed.certificate))  # fmt: skip


def decode_signed(payload: bytes | memoryview) -> Signed:
    reader = _Reader(payload, 2 + MAX_SIGNATURE_BYTES + 2 + MAX_CERTIFICATE_BYTES, "advert")
    signed = _read_signed(reader)
    reader.end()
    return signed


# -- rosters ------------------------------------------------------------------------------------------
def encode_roster(roster: Roster, signed: dict[int, Signed]) -> bytes:
    parts = [_U32.pack(len(roster.advertised)), *(_U32.pack(i) for i in roster.advertised)]
    parts.append(_U32.pack(len(roster.cipher_pks)))
    for j in sorted(roster.cipher_pks):
        parts.append(_NEIGHBOUR.pack(j, roster.cipher_pks[j], roster.mask_pks[j]))
        parts.append(encode_signed(signed.get(j, Signed())))
    return b"".join(parts)


def decode_roster(
    payload: bytes | memoryview, session: str, round: int, party: int, graph_seed: int, n: int, degree: int
) -> tuple[Roster, dict[int, Signed]]:
    """The roster for ``party``: at most ``n`` advertised ids and ``degree`` neighbours' keys."""
    per_neighbour = _NEIGHBOUR.size + 4 + MAX_SIGNATURE_BYTES + MAX_CERTIFICATE_BYTES
    reader = _Reader(payload, 8 + 4 * n + degree * per_neighbour, "roster")
    advertised = tuple(reader.ids(n, n))
    count = reader.count(degree)
    cipher, mask, signed = {}, {}, {}
    for _ in range(count):
        j, cipher_pk, mask_pk = _NEIGHBOUR.unpack(reader.take(_NEIGHBOUR.size))
        _check_id(j, n)
        if j in cipher:
            raise WireError(f"the roster lists neighbour {j} twice")
        cipher[j], mask[j], signed[j] = cipher_pk, mask_pk, _read_signed(reader)
    reader.end()
    return Roster(session, round, party, graph_seed, advertised, cipher, mask), signed


# -- shares (party -> arbiter: by receiver) and inboxes (arbiter -> party: by sender) -------------------
def encode_shares(shares: Iterable[EncryptedShare], by_sender: bool = False) -> bytes:
    return b"".join(_SHARE.pack(s.sender if by_sender else s.receiver, s.ciphertext) for s in shares)


def decode_shares(payload: bytes | memoryview, session: str, round: int, sender: int, n: int, degree: int):
    """A party's shares, one for each of at most ``degree`` receivers."""
    return [EncryptedShare(session, round, sender, peer, sealed) for peer, sealed in _records(payload, n, degree)]


def decode_inbox(payload: bytes | memoryview, session: str, round: int, receiver: int, n: int, degree: int):
    """The shares for ``receiver``, from at most ``degree`` senders."""
    return [EncryptedShare(session, round, peer, receiver, sealed) for peer, sealed in _records(payload, n, degree)]


def _records(payload: bytes | memoryview, n: int, degree: int) -> list[tuple[int, bytes]]:
    reader = _Reader(payload, degree * _SHARE.size, "shares")
    if len(reader) % _SHARE.size:
        raise WireError(f"shares of {len(reader)} bytes are not whole records of {_SHARE.size}")
    out = []
    for _ in range(len(reader) // _SHARE.size):
        peer, sealed = _SHARE.unpack(reader.take(_SHARE.size))
        out.append((_check_id(peer, n), sealed))
    return out


# -- unmask requests and replies -------------------------------------------------------------------------
def encode_request(request: UnmaskRequest) -> bytes:
    parts = []
    for ids in (sorted(request.alive), sorted(request.dropped)):
        parts += [_U32.pack(len(ids)), *(_U32.pack(i) for i in ids)]
    return b"".join(parts)


def decode_request(payload: bytes | memoryview, session: str, round: int, party: int, n: int, degree: int):
    """Who is alive (at most the party's ``degree`` neighbours and itself) and who dropped."""
    reader = _Reader(payload, 8 + 4 * (2 * degree + 1), "unmask request")
    alive = frozenset(reader.ids(degree + 1, n))
    dropped = frozenset(reader.ids(degree, n))
    reader.end()
    return UnmaskRequest(session, round, party, alive, dropped)


def encode_reply(reply: UnmaskReply) -> bytes:
    parts = [_REPLY.pack(SELF, j, s.to_bytes(SHARE_BYTES, "big")) for j, s in sorted(reply.self_shares.items())]
    parts += [_REPLY.pack(KEY, j, s.to_bytes(SHARE_BYTES, "big")) for j, s in sorted(reply.key_shares.items())]
    return b"".join(parts)


def decode_reply(payload: bytes | memoryview, session: str, round: int, party: int, n: int, degree: int):
    """At most one share of one kind for each of at most ``degree`` neighbours."""
    reader = _Reader(payload, degree * _REPLY.size, "unmask reply")
    if len(reader) % _REPLY.size:
        raise WireError(f"an unmask reply of {len(reader)} bytes is not whole records of {_REPLY.size}")
    shares: dict[int, dict[int, int]] = {SELF: {}, KEY: {}}
    for _ in range(len(reader) // _REPLY.size):
        kind, peer, raw = _REPLY.unpack(reader.take(_REPLY.size))
        if kind not in shares:
            raise WireError(f"an unmask reply holds a share of unknown kind {kind}")
        if peer in shares[SELF] or peer in shares[KEY]:
            raise WireError(f"an unmask reply holds two shares for {peer}")
        shares[kind][_check_id(peer, n)] = int.from_bytes(raw, "big")
    return UnmaskReply(session, round, party, shares[SELF], shares[KEY])


# -- internals -------------------------------------------------------------------------------------------
def _read_signed(reader: _Reader) -> Signed:
    signature = reader.take(reader.u16(MAX_SIGNATURE_BYTES, "signature"))
    certificate = reader.take(reader.u16(MAX_CERTIFICATE_BYTES, "certificate"))
    return Signed(signature, certificate)


def _check_id(party: int, n: int) -> int:
    if not 1 <= party <= n:
        raise WireError(f"party id {party} outside the round's 1..{n}")
    return party


class _Reader:
    """Bounds-checked reads from a payload that was refused first if longer than ``most`` bytes."""

    def __init__(self, payload: bytes | memoryview, most: int, what: str) -> None:
        self.view = memoryview(payload)
        self.what = what
        if self.view.nbytes > most:
            raise WireError(f"a {what} of {self.view.nbytes} bytes; this round allows at most {most}")
        self.at = 0

    def __len__(self) -> int:
        return self.view.nbytes

    def take(self, n: int) -> bytes:
        if self.at + n > self.view.nbytes:
            raise WireError(f"the {self.what} ends {self.at + n - self.view.nbytes} bytes early")
        out = bytes(self.view[self.at : self.at + n])
        self.at += n
        return out

    def u16(self, most: int, what: str) -> int:
        (value,) = _U16.unpack(self.take(_U16.size))
        if value > most:
            raise WireError(f"a {what} of {value} bytes in the {self.what}; at most {most}")
        return value

    def count(self, most: int) -> int:
        (value,) = _U32.unpack(self.take(_U32.size))
        if value > most:
            raise WireError(f"the {self.what} counts {value} entries; this round allows at most {most}")
        return value

    def ids(self, most: int, n: int) -> list[int]:
        ids = [_check_id(_U32.unpack(self.take(_U32.size))[0], n) for _ in range(self.count(most))]
        if len(set(ids)) != len(ids):
            raise WireError(f"the {self.what} lists a party twice")
        return ids

    def end(self) -> None:
        if self.at != self.view.nbytes:
            raise WireError(f"the {self.what} has {self.view.nbytes - self.at} bytes after its end")
