"""The protocol's primitives, all from ``cryptography``: X25519 agreement, HKDF-SHA256, AES-256-GCM, AES-128-CTR.

Every key is derived with HKDF from a full 32-byte secret (an X25519 agreement or a self-mask seed) and a
context that names the session, the round, the parties and the purpose, so no key serves two purposes, two
rounds or two pairs, and a message sealed for one context does not open in another. Share keys are 256-bit
(AES-256-GCM); mask keys are 128-bit (AES-128-CTR keystreams, ``masks.py``): masking a 10M-param update with
k = 8 neighbours is 9 keystreams of the model's size, the keystream is the masking's bottleneck, and AES-128 makes
masking 1.26x faster on AES-NI (benchmarks/secagg.py) at the security level of the 128-bit X25519 agreement itself.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfleet.secagg.errors import SecAggRefused

KEY_BYTES = 32
NONCE_BYTES = 12
PROTOCOL = b"fedfleet-secagg-v2"  # v2: 128-bit mask keys

# purposes of derived keys
SHARE = "share"  # AES-GCM key of the shares one party sends another (directed: sender, receiver)
PAIR_MASK = "pair-mask"  # AES-CTR key of the pairwise mask of two parties (undirected: lower id first)
SELF_MASK = "self-mask"  # AES-CTR key of a party's self mask (one party)
KEY_LENGTHS = {SHARE: 32, PAIR_MASK: 16, SELF_MASK: 16}  # bytes of each purpose's derived key

_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def generate() -> X25519PrivateKey:
    """A fresh X25519 private key (one per purpose, per round)."""
    return X25519PrivateKey.generate()


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(**_RAW)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(data)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte X25519 shared secret with a peer's raw public key. A malformed key, or one of small order
    (whose secret would be all zeros, known to anyone), is refused."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggRefused(f"a peer's public key is unusable: {exc}") from exc


def context(session: str, round: int, parties: tuple[int, ...], purpose: str) -> bytes:
    """HKDF's info: length-prefixed fields, so no two different contexts encode to the same bytes."""
    fields = [PROTOCOL, session.encode(), purpose.encode()]
    out = b"".join(struct.pack(">I", len(f)) + f for f in fields)
    return out + struct.pack(f">q{len(parties)}q", round, *parties)


def derive(secret: bytes, session: str, round: int, parties: tuple[int, ...], purpose: str) -> bytes:
    """A key (``KEY_LENGTHS[purpose]`` bytes) from a 32-byte secret for one (session, round, parties, purpose)."""
    info = context(session, round, parties, purpose)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LENGTHS[purpose], salt=None, info=info)
    return hkdf.derive(secret)


def share_aad(session: str, round: int, sender: int, receiver: int) -> bytes:
    """What a sealed share is bound to: a share replayed into another session, round or pair does not open."""
    return context(session, round, (sender, receiver), SHARE)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: a random 96-bit nonce, then the ciphertext and its tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ``seal``; SecAggRefused when the tag does not verify (a wrong key, AAD or any change)."""
    if len(sealed) < NONCE_BYTES + 16:
        raise SecAggRefused("a sealed message is too short to hold a nonce and a tag")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggRefused("a sealed message failed its AES-GCM tag check") from exc
