"""Update transforms of the aggregation pipeline (``fedfleet.core.pipeline``), one file each, registered by name.

``TRANSFORMS`` holds party-side ones (applied to an update before it is sent) and fold ones (applied by the
arbiter around the strategy's aggregator); a job names them in ``transforms: {client: [...], server: [...]}``.
Robust aggregation rules (``robust.py``) are fold transforms; attacker behaviours for simulated clients
(``attacks.py``) are party-side ones.
"""

from fedfleet.transforms import attacks, robust  # noqa: F401 (their registrations)
from fedfleet.transforms.base import FOLD_TRANSFORMS, PARTY_TRANSFORMS, JobFacts, build_pipeline
from fedfleet.transforms.clip import ClipNorm, ClipNormBeforeFold

__all__ = ["FOLD_TRANSFORMS", "PARTY_TRANSFORMS", "ClipNorm", "ClipNormBeforeFold", "JobFacts", "build_pipeline"]
