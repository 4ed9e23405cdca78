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
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares are inconsistent: they rebuild no 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def encode(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def decode(data: bytes) -> int:
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise ValueError("not a share of this field")
    return value
