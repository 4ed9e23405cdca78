"""In-process simulation runtimes: sequential (any trainer) and cohort-vectorised (the cohort as one model)."""

from __future__ import annotations

import logging
from typing import Any

from fedfleet.runtime.sim.choice import AutoRuntime, cohort_wins_on_cpu
from fedfleet.runtime.sim.sequential import SequentialRuntime, client_seed
from fedfleet.runtime.sim.vectorized import NotVectorizable, VectorizedRuntime

log = logging.getLogger(__name__)

VECTORIZE_MODES = ("auto", "on", "off")


def make_runtime(trainer: Any, federation: Any, test_data: Any = None, vectorize: str = "auto") -> Any:
    """``on``: the cohort at once, or an error; ``off``: clients one by one; ``auto``: the cohort at once on a GPU
    when the model allows, and on a CPU for the rounds where it wins (``choice.cohort_wins_on_cpu``: enough
    clients, a small model without convolutions); a model that cannot be batched trains one by one, logged."""
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"vectorize must be one of {VECTORIZE_MODES}, got {vectorize!r}")
    sequential = SequentialRuntime(trainer, federation, test_data)
    if vectorize == "off":
        return sequential
    try:
        vectorized = VectorizedRuntime(trainer, federation, test_data)
    except NotVectorizable as exc:
        if vectorize == "on":
            raise
        log.info("training clients one by one: %s", exc)
        return sequential
    on_gpu = getattr(getattr(trainer, "device", None), "type", "cpu") == "cuda"
    if vectorize == "on" or on_gpu:
        return vectorized
    return AutoRuntime(sequential, vectorized)


__all__ = [
    "AutoRuntime",
    "NotVectorizable",
    "SequentialRuntime",
    "VectorizedRuntime",
    "client_seed",
    "cohort_wins_on_cpu",
    "make_runtime",
]
