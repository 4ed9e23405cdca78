"""Fixed-point encoding of updates for the masking ring, with unbiased stochastic rounding.

A value v in [-clip, clip] maps to (v + clip) * L / (2 * clip) with L = 2**bits - 1 levels, rounded down or up
at random with the probability that makes the expectation exact (to about 2**-32 of a step: the draws are
32-bit): floor(x + u), u uniform in [0, 1), is floor(x) + 1 with probability frac(x).
Sums of quantised values are then sums of integers, which the masks leave exact in the ring (uint32 or uint64
arithmetic wraps mod 2**ring_bits, and the plan picks a ring that n parties' sum cannot wrap).

The draws are AES-128-CTR keystream under a key drawn from the caller's generator, so they repeat with its
seed. They need not be secret (the masks hide the rounded values), only uniform; AES is used because it is the
fastest uniform source here: with numpy's float64 ``Generator.random`` and floor / fraction / compare the same
quantiser is 1.25-1.49x slower (benchmarks/secagg.py measures both; RESULTS.md, 2026-12-06).

Error bound: one quantisation step, step = 2 * clip / (2**bits - 1), per element and per party. The dequantised
sum of ``count`` parties is within count * step of the true sum of their clipped values, element by element
(strictly less; its expectation is exact and its standard deviation at most sqrt(count) * step / 2).
"""

from __future__ import annotations

import numpy as np

from fedfleet.secagg.masks import Keystream

CHUNK = 1 << 15  # elements per pass: two float64 temporaries of 256 KiB stay in cache (fastest in benchmarks/secagg.py)


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
    out: np.ndarray | None = None,
    add: bool = False,
) -> np.ndarray:
    """Flat float values clipped to [-clip, clip], then multiplied by ``scale`` in [0, 1] (a party's weight
    factor; it keeps them in range), as ring integers in 0..2**bits - 1; written into ``out`` if given (a
    slice of the masked vector, sparing a copy of the model), or with ``add`` added to it in its ring (into
    masks made ahead of the update)."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"scale must be in [0, 1], got {scale}")
    flat = np.asarray(values).reshape(-1)
    if out is None and add:
        raise ValueError("add=True adds the quantised values into out: give out")
    if out is None:
        out = np.empty(flat.size, dtype=dtype)
    elif out.shape != flat.shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"out must be {flat.size} x {np.dtype(dtype)}, got {out.shape} x {out.dtype}")
    top = 2**bits - 1
    mul, off = scale * top / (2.0 * clip), top / 2.0
    # clip(v) * mul + off == clip(v * mul + off) to these bounds; also kept in 0..top against rounding
    lo_bound, hi_bound = max(off - clip * mul, 0.0), min(off + clip * mul, float(top))
    size = min(CHUNK, flat.size)
    x, u = np.empty(size), np.empty(size)
    draw = np.empty(size, dtype=np.dtype("<u4"))
    levels = np.empty(size, dtype=out.dtype) if add else None
    draws_from = Keystream(rng.bytes(16))
    for lo in range(0, flat.size, CHUNK):
        n = min(CHUNK, flat.size - lo)
        xs, us, draws = x[:n], u[:n], draw[:n]
        np.multiply(flat[lo : lo + n], mul, out=xs, dtype=np.float64)  # float64 even for float32 input
        xs += off
        np.clip(xs, lo_bound, hi_bound, out=xs)
        draws_from.fill(draws)
        np.multiply(draws, 2.0**-32, out=us)  # exact: u = j / 2**32, j uniform in 0..2**32 - 1
        xs += us
        if top >= 2**20:  # below 2**20 float64 holds x + u exactly enough that it stays under top + 1
            np.minimum(xs, top, out=xs)
        if levels is None:
            out[lo : lo + n] = xs  # truncation: the floor, as x + u >= 0
        else:
            levels[:n] = xs
            np.add(out[lo : lo + n], levels[:n], out=out[lo : lo + n])  # wraps in the ring, as masks do
    return out


def dequantize(total: np.ndarray, count: int, clip: float, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """The float64 sum of ``count`` parties' values from the ring sum of their quantised values (into ``out``,
    float64 of total's size, if given: the same numbers)."""
    out = np.multiply(np.asarray(total), step(clip, bits), out=out, dtype=np.float64)
    out -= count * clip
    return out


def quantize_weight(factor: float, levels: int, dtype: np.dtype | type, rng: np.random.Generator) -> np.ndarray:
    """A weight factor f in [0, 1] as one ring element in 0..levels (stochastically rounded, unbiased): the
    plan gives the weight as many levels as n parties can sum, far finer than the params' 2**bits."""
    return stochastic_round(np.array([factor * levels], dtype=np.float64), rng, np.dtype(dtype))


def dequantize_weight(total: int, levels: int) -> float:
    """The sum of the parties' weight factors, each within 1 / levels of its true value."""
    return int(total) / levels
