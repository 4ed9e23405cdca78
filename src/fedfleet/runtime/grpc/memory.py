"""Keep glibc from hoarding the transient frames of a large transfer.

Every chunk passes through a few MiB-sized buffers (the encoded frame, gRPC's copy of it, the received
bytes). glibc raises its mmap threshold after the first such buffer is freed, so later ones come from the
heap, where fragmentation keeps them resident: a party sending a 128 MiB model was measured 0.3 x the model
above its inbox, an arbiter 0.35 x above its two buffers (benchmarks/streaming.py). A fixed threshold makes
each large buffer an mmap that returns to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_BUFFER_BYTES = 1 << 20
_done = False


def return_large_buffers_to_the_system(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Fix glibc's mmap threshold (once per process). False where that does not apply (not glibc)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    return _done
