"""In-process simulation runtimes: sequential (any trainer) and cohort-vectorised (vmap-able models)."""

from __future__ import annotations

import logging
from typing import Any

from fedfleet.runtime.sim.sequential import SequentialRuntime, client_seed
from fedfleet.runtime.sim.vectorized import NotVectorizable, VectorizedRuntime

log = logging.getLogger(__name__)

VECTORIZE_MODES = ("auto", "on", "off")


def make_runtime(trainer: Any, federation: Any, test_data: Any = None, vectorize: str = "auto") -> Any:
    """``on``: vectorised or an error; ``off``: sequential; ``auto``: vectorised when the model allows it."""
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"vectorize must be one of {VECTORIZE_MODES}, got {vectorize!r}")
    if vectorize == "off":
        return SequentialRuntime(trainer, federation, test_data)
    try:
        return VectorizedRuntime(trainer, federation, test_data)
    except NotVectorizable as exc:
        if vectorize == "on":
            raise
        log.info("training clients one by one: %s", exc)
        return SequentialRuntime(trainer, federation, test_data)


__all__ = ["NotVectorizable", "SequentialRuntime", "VectorizedRuntime", "client_seed", "make_runtime"]
