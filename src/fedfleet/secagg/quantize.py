"""Fixed-point encoding of updates for the masking ring, with unbiased stochastic rounding.

A value v in [-clip, clip] maps to (v + clip) * L / (2 * clip) with L = 2**bits - 1 levels, rounded down or up
at random with the probability that makes the expectation exact. Sums of quantised values are then sums of
integers, which the masks leave exact in the ring (uint32 or uint64 arithmetic wraps mod 2**ring_bits, and the
plan picks a ring that n parties' sum cannot wrap).

Error bound: one quantisation step, step = 2 * clip / (2**bits - 1), per element and per party. The dequantised
sum of ``count`` parties is within count * step of the true sum of their clipped values, element by element
(strictly less; its expectation is exact and its standard deviation at most sqrt(count) * step / 2).
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 18  # elements per pass: float64 temporaries of 2 MiB stay in cache instead of 8 bytes x model


def step(clip: float, bits: int) -> float:
    """One quantisation step: the per-element, per-party error bound."""
    return 2.0 * clip / (2**bits - 1)


def stochastic_round(scaled: np.ndarray, rng: np.random.Generator, dtype: np.dtype) -> np.ndarray:
    """floor(x) + 1 with probability frac(x), else floor(x), for non-negative float64 x: E[result] = x."""
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return low.astype(dtype) + up.astype(dtype)


def quantize(
    values: np.ndarray,
    clip: float,
    bits: int,
    dtype: np.dtype | type,
    rng: np.random.Generator,
    *,
    scale: float = 1.0,
) -> np.ndarray:
    """Flat float values clipped to [-clip, clip], then multiplied by ``scale`` in [0, 1] (a party's weight
    factor; it keeps them in range), as ring integers in 0..2**bits - 1."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"scale must be in [0, 1], got {scale}")
    flat = np.asarray(values).reshape(-1)
    out = np.empty(flat.size, dtype=dtype)
    levels = (2**bits - 1) / (2.0 * clip)
    for lo in range(0, flat.size, CHUNK):
        part = np.clip(flat[lo : lo + CHUNK].astype(np.float64), -clip, clip)
        if scale != 1.0:
            part *= scale
        part += clip
        part *= levels
        np.minimum(part, 2**bits - 1, out=part)  # rounding error must not push a clip-edge value past the top
        out[lo : lo + CHUNK] = stochastic_round(part, rng, out.dtype)
    return out


def dequantize(total: np.ndarray, count: int, clip: float, bits: int) -> np.ndarray:
    """The float64 sum of ``count`` parties' values from the ring sum of their quantised values."""
    return np.asarray(total).astype(np.float64) * step(clip, bits) - count * clip


def quantize_weight(factor: float, levels: int, dtype: np.dtype | type, rng: np.random.Generator) -> np.ndarray:
    """A weight factor f in [0, 1] as one ring element in 0..levels (stochastically rounded, unbiased): the
    plan gives the weight as many levels as n parties can sum, far finer than the params' 2**bits."""
    return stochastic_round(np.array([factor * levels], dtype=np.float64), rng, np.dtype(dtype))


def dequantize_weight(total: int, levels: int) -> float:
    """The sum of the parties' weight factors, each within 1 / levels of its true value."""
    return int(total) / levels
