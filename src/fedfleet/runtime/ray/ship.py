"""Objects with tensors, packed so that Ray moves the tensor bytes without pickling them.

Why: Ray pickles a ``torch.Tensor`` through torch's own reducer, which copies it into a bytes object (about
100 ms per round-trip of a 5 MB model on 2 cores, measured), while NumPy arrays travel out of band, and a
worker on the same node reads them straight from the shared object store (zero-copy). :func:`ship` pickles
any object (a model, a federation, flat params) with every CPU tensor replaced by a raw-byte NumPy view of
it; :func:`land` rebuilds the object with tensors viewing those bytes.
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Shipped:
    """A pickled object whose tensors travel beside it as raw bytes (``arrays``, one per tensor)."""

    meta: bytes
    arrays: tuple[np.ndarray, ...]


def ship(obj: Any) -> Shipped:
    """Pack ``obj`` for ``ray.put`` or a remote call. Tensors are moved to the CPU (a copy only off-CPU)."""
    from ray import cloudpickle  # by value: classes and functions defined in the user's __main__ travel too

    arrays: list[np.ndarray] = []

    class _Pickler(cloudpickle.CloudPickler):
        def persistent_id(self, value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or type(value) is torch.nn.Parameter:
                return None  # a Parameter keeps its class and requires_grad: its .data comes back here
            flat = value.detach().cpu().contiguous().reshape(-1)
            arrays.append(flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8))
            return ("tensor", len(arrays) - 1, value.dtype, tuple(value.shape))

    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return Shipped(buf.getvalue(), tuple(arrays))


def land(shipped: Shipped, *, writable: bool = False) -> Any:
    """Rebuild a shipped object on the CPU.

    Without ``writable`` its tensors view the received bytes: in a Ray worker that is shared, read-only
    object-store memory, right for data that is only read (a federation, params to load from). With
    ``writable`` each tensor is copied first, as a model's own params and buffers must be.
    """
    arrays = shipped.arrays

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            _, index, dtype, shape = pid
            data = arrays[index].copy() if writable else arrays[index]
            with warnings.catch_warnings():
                # torch warns that it cannot mark a tensor read-only; the object store's pages are only read
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(data)
            return raw.view(dtype).reshape(shape) if raw.numel() else torch.empty(shape, dtype=dtype)

    return _Unpickler(io.BytesIO(shipped.meta)).load()
