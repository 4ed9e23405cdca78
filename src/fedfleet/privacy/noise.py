"""Gaussian noise from a cryptographic generator: AES-256-CTR keystream -> uniforms -> Box-Muller normals.

Why not torch's or numpy's generator: their state can be recovered from enough output (Mersenne Twister,
PCG64), and then the noise subtracted from a released model. Here every noise vector comes from a fresh
32-byte key: ``secure`` draws it from the operating system (``os.urandom``), nobody can replay it;
``seeded`` derives it from (seed, round, stream) with SHA-256, so a seeded run repeats bit for bit (tests,
debugging) and must not be used where the threat model needs the noise secret.

Each normal takes two 64-bit keystream words (Box-Muller: 53-bit uniforms u1 in (0, 1], u2 in [0, 1)), drawn in
float64 and added in the params' dtype. Memory: one block of ``BLOCK`` normals at a time, not the model's size.
Known limit: like every floating-point sampler this one is not hardened against Mironov's 2012 attack on
the least significant bits; the released model is rounded to float32 afterwards, which blunts but does not
remove it (docs/differential-privacy.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from enum import Enum

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedfleet.core.params import FlatParams

BLOCK = 1 << 18  # normals per keystream block (4 MiB of keystream)
_TWO_PI = 2.0 * np.pi
_U53 = 2.0**-53


class NoiseSource(str, Enum):
    SECURE = "secure"  # keys from os.urandom: the deployed default
    SEEDED = "seeded"  # keys from the job's seed: reproducible, for tests and debugging only


def noise_key(source: NoiseSource, seed: int, round: int, stream: str) -> bytes:
    """The 32-byte key of one noise vector: fresh from the OS, or derived from (seed, round, stream)."""
    if NoiseSource(source) is NoiseSource.SECURE:
        return os.urandom(32)
    label = f"fedfleet-dp-noise|{seed}|{round}|{stream}".encode()
    return hashlib.sha256(label).digest()


def normal_blocks(key: bytes, count: int) -> Iterator[np.ndarray]:
    """``count`` standard normals (float64) from the keystream of ``key``, in blocks of at most ``BLOCK``."""
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    for lo in range(0, count, BLOCK):
        n = min(BLOCK, count - lo)
        pairs = (n + 1) // 2  # Box-Muller gives two normals per pair of uniforms: r cos(t) and r sin(t)
        # word 2i and 2i + 1 make normals 2i and 2i + 1: a vector's first normals do not depend on its length
        words = np.frombuffer(enc.update(bytes(16 * pairs)), dtype="<u8").reshape(pairs, 2)
        u1 = ((words[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * _U53  # (0, 1]: log(u1) is finite
        theta = (words[:, 1] >> np.uint64(11)).astype(np.float64) * (_U53 * _TWO_PI)
        r = np.sqrt(-2.0 * np.log(u1))
        block = np.empty((pairs, 2), dtype=np.float64)
        np.multiply(r, np.cos(theta), out=block[:, 0])
        np.multiply(r, np.sin(theta), out=block[:, 1])
        yield block.reshape(-1)[:n]


def normals(key: bytes, count: int) -> np.ndarray:
    """``count`` standard normals (float64) from the keystream of ``key`` (tests; the adder streams blocks)."""
    return np.concatenate(list(normal_blocks(key, count))) if count else np.empty(0)


def add_gaussian_(params: FlatParams, std: float, key: bytes) -> FlatParams:
    """params += N(0, std^2) per element, in place. One key covers every dtype buffer, one block at a time: the
    buffers are walked in order as one vector, so the noise does not depend on how the model splits by dtype."""
    if not (np.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    if std == 0.0:
        return params
    flats = [buf.view(-1) for buf in params.buffers.values()]
    blocks = normal_blocks(key, params.numel)
    pending = np.empty(0)
    for flat in flats:
        lo = 0
        while lo < flat.numel():
            if pending.size == 0:
                pending = next(blocks)
            n = min(pending.size, flat.numel() - lo)
            noise = torch.from_numpy(pending[:n] * std).to(device=flat.device, dtype=flat.dtype)
            flat[lo : lo + n].add_(noise)
            pending, lo = pending[n:], lo + n
    return params
