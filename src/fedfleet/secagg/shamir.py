"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2**521 - 1 (a Mersenne prime).

No maintained Python library fits (the candidates are unmaintained or share only small ints), and the scheme is
a polynomial and a Lagrange interpolation, so it is written here and tested. The field is larger than any
secret (2**256) so every secret is one field element. The x-coordinates are the receivers' party ids (ints >= 1),
so a share needs no index beside it.

The polynomial's coefficients come from ``secrets`` (the OS's cryptographic source), never from a seeded
generator: a reproducible polynomial would hand the secret to anyone who knows the seed. Shares are not
authenticated: a wrong share gives a wrong secret, which the caller detects where it can (the server checks a
rebuilt mask key against its advertised public key).
"""

from __future__ import annotations

import secrets

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # a field element, big-endian: ceil(521 / 8)


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, int]:
    """Shares of ``secret`` at each x in ``xs``; any ``threshold`` of them rebuild it, fewer say nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or any(not 1 <= x < PRIME for x in xs):
        raise ValueError(f"share x-coordinates must be distinct ints >= 1, got {sorted(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in 1..{len(xs)} (the number of shares), got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: dict[int, int], threshold: int) -> bytes:
    """The secret from ``threshold`` of ``shares`` (the lowest x-coordinates): Lagrange interpolation at 0."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot rebuild a secret that needs {threshold}")
    points = sorted(shares.items())[:threshold]
    xs = [x for x, _ in points]
    nums, dens = [], []
    for i, xi in enumerate(xs):  # basis polynomial i at 0: prod x_j / prod (x_j - x_i), j != i
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        nums.append(num)
        dens.append(den)
    inverses = _invert_all(dens)
    secret = sum(y * num * inv for (_, y), num, inv in zip(points, nums, inverses, strict=True)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares are inconsistent: they rebuild no 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _invert_all(values: list[int]) -> list[int]:
    """Every value's inverse mod PRIME with one modular exponentiation (Montgomery's batch trick): the server
    rebuilds a secret per party, and pow(x, -1, p) of a 521-bit x costs as much as hundreds of products."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def encode(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def decode(data: bytes) -> int:
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise ValueError("not a share of this field")
    return value
