"""The simulation on a Ray cluster (``runtime.kind: ray``); Ray is an optional extra: ``pip install 'fedfleet[ray]'``.

Nothing here imports Ray until a runtime starts, so fedfleet imports without it.
"""

from fedfleet.runtime.ray.runtime import RayOptions, RayRuntime, WorkerLostError, require_ray, split_cohort
from fedfleet.runtime.ray.worker import TrainerFactory

__all__ = [
    "RayOptions",
    "RayRuntime",
    "TrainerFactory",
    "WorkerLostError",
    "require_ray",
    "split_cohort",
]
