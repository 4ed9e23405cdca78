"""In-process simulation runtimes: sequential (any trainer) and cohort-vectorised (vmap-able models)."""

from __future__ import annotations

import logging
from typing import Any

from fedfleet.runtime.sim.sequential import SequentialRuntime, client_seed
from fedfleet.runtime.sim.vectorized import NotVectorizable, VectorizedRuntime

log = logging.getLogger(__name__)

VECTORIZE_MODES = ("auto", "on", "off")


def make_runtime(trainer: Any, federation: Any, test_data: Any = None, vectorize: str = "auto") -> Any:
    """``on``: vectorised or an error; ``off``: sequential; ``auto``: vectorised on a GPU when the model allows.

    ``auto`` keeps CPUs sequential: there a batched convolution over a cohort's weights ran about 2x slower
    than the clients one by one (benchmarks/vectorized.py --quick, RESULTS.md); a GPU is where it pays.
    """
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"vectorize must be one of {VECTORIZE_MODES}, got {vectorize!r}")
    on_gpu = getattr(getattr(trainer, "device", None), "type", "cpu") == "cuda"
    if vectorize == "off" or (vectorize == "auto" and not on_gpu):
        return SequentialRuntime(trainer, federation, test_data)
    try:
        return VectorizedRuntime(trainer, federation, test_data)
    except NotVectorizable as exc:
        if vectorize == "on":
            raise
        log.info("training clients one by one: %s", exc)
        return SequentialRuntime(trainer, federation, test_data)


__all__ = ["NotVectorizable", "SequentialRuntime", "VectorizedRuntime", "client_seed", "make_runtime"]
