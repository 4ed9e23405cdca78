"""Update transforms of the aggregation pipeline (``fedfleet.core.pipeline``), one file each, registered by name.

``TRANSFORMS`` holds party-side ones (applied to an update before it is sent) and fold ones (applied by the
arbiter around the strategy's aggregator); a job names them in ``transforms: {client: [...], server: [...]}``.
"""

from fedfleet.transforms.base import FOLD_TRANSFORMS, PARTY_TRANSFORMS, build_pipeline
from fedfleet.transforms.clip import ClipNorm, ClipNormBeforeFold

__all__ = ["FOLD_TRANSFORMS", "PARTY_TRANSFORMS", "ClipNorm", "ClipNormBeforeFold", "build_pipeline"]
