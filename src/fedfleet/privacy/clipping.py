"""L2 clipping of one update's delta for differential privacy: flat (one bound over every exchanged tensor) or
per layer (each tensor to C / sqrt(L), so the whole delta is still within C).

Returns the norm before clipping, which adaptive clipping turns into its "was this update unclipped" bit. A zero
delta is fine (nothing is divided by its norm), and a NaN or inf norm is an error, never a silent pass.
"""

from __future__ import annotations

import math

from fedfleet.core.params import FlatParams


def clip_flat_(delta: FlatParams, bound: float) -> float:
    """Scale ``delta`` in place to L2 norm <= ``bound``; returns its norm before."""
    norm = math.sqrt(delta.sq_norm())
    _check(norm)
    if norm > bound:
        delta.mul_(bound / norm)
    return norm


def clip_per_layer_(delta: FlatParams, bound: float) -> float:
    """Scale each tensor of ``delta`` to norm <= bound / sqrt(L) (L tensors); returns the whole norm before."""
    tensors = list(delta.tensors().values())
    each = bound / math.sqrt(len(tensors))
    total = 0.0
    for tensor in tensors:
        sq = float(tensor.double().square().sum())
        total += sq
        norm = math.sqrt(sq)
        _check(norm)
        if norm > each:
            tensor.mul_(each / norm)
    return math.sqrt(total)


def _check(norm: float) -> None:
    if not math.isfinite(norm):
        raise ValueError(f"the update's norm is {norm}: NaN or inf values cannot be clipped into a privacy bound")


CLIPPERS = {False: clip_flat_, True: clip_per_layer_}  # by ``per_layer``
