"""The mask generator: AES-CTR keystreams added into a ring vector, in place.

A mask is the keystream of AES-128-CTR under a 16-byte key derived from a full 32-byte secret (``crypto.derive``;
a 32-byte key gives AES-256-CTR), read as little-endian ring elements (uint32 or uint64). Each key serves one
stream only, so the counter starts at zero. Why this shape:
- the keystream is written into one preallocated buffer with ``update_into`` (no allocation per chunk), and
  numpy adds it into the accumulator in place; unsigned arithmetic wraps mod 2**32 (2**64), which is the ring;
- the accumulator is walked in chunks (256 KiB by default, as measured in benchmarks/secagg.py) and every
  stream is applied to a chunk before the next one, so the chunk stays in cache and memory stays O(model) for
  any number of streams (never k masks of the model's size at once).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK_BYTES = 1 << 18
_ZERO_COUNTER = bytes(16)
_ZEROS = np.zeros(CHUNK_BYTES, dtype=np.uint8)  # CTR encrypts zeros into the bare keystream
_ZEROS.setflags(write=False)


class Keystream:
    """One AES-CTR stream (counter from zero), read in consecutive pieces into buffers the caller owns."""

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()

    def fill(self, out: np.ndarray) -> None:
        """The stream's next ``out.nbytes`` bytes into ``out`` (contiguous), as they come: read them through a
        little-endian dtype for the same numbers on every machine."""
        raw = out.reshape(-1).view(np.uint8)
        for lo in range(0, raw.size, CHUNK_BYTES):
            piece = raw[lo : lo + CHUNK_BYTES]
            self._encryptor.update_into(_ZEROS[: piece.size], piece)


def add_masks(
    acc: np.ndarray, masks: Iterable[tuple[bytes, int]], chunk_bytes: int = CHUNK_BYTES, *, overwrite: bool = False
) -> None:
    """acc += sum of sign * PRG(key) over ``masks`` (pairs of key and sign +1 / -1), in acc's ring, in place;
    with ``overwrite``, acc = that sum (acc's old values are not read: no zeroing pass first)."""
    if acc.dtype not in (np.uint32, np.uint64) or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError(f"masks go into a flat contiguous uint32 / uint64 vector, got {acc.dtype} {acc.shape}")
    streams = [(Keystream(key), sign) for key, sign in masks]
    if not streams:
        return
    per_chunk = max(1, chunk_bytes // acc.itemsize)
    buf = np.empty(per_chunk, dtype=acc.dtype.newbyteorder("<"))  # the keystream's byte order, whatever the machine's
    for lo in range(0, acc.size, per_chunk):
        part = acc[lo : lo + per_chunk]
        ks = buf[: part.size]
        for n, (stream, sign) in enumerate(streams):
            stream.fill(ks)
            if overwrite and n == 0 and sign > 0:
                np.copyto(part, ks)
            elif overwrite and n == 0:
                np.negative(ks, out=part)
            elif sign > 0:
                np.add(part, ks, out=part)
            else:
                np.subtract(part, ks, out=part)


def keystream(key: bytes, count: int, dtype: np.dtype | type) -> np.ndarray:
    """The first ``count`` ring elements of one mask (what ``add_masks`` adds for sign +1)."""
    out = np.zeros(count, dtype=dtype)
    add_masks(out, [(key, 1)])
    return out
