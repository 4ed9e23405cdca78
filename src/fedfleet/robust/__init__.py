"""Robust aggregation against bad parties: rules that bound what a few Byzantine updates can do to a round.

Each rule is one file and a fold transform of the aggregation pipeline (``fedfleet.core.pipeline``),
registered by name in ``fedfleet.transforms`` (``transforms: {server: [{name: trimmed_mean, beta: 0.2}]}``),
so it composes with any strategy that averages updates: the rule replaces the round's weighted mean and the
strategy's server step applies the result.

- ``median``: coordinate-wise median; ``trimmed_mean``: coordinate-wise trimmed mean (beta)
- ``krum``: Krum / multi-Krum (f, m); ``bulyan``: Bulyan (f)
- ``geomedian``: geometric median by smoothed Weiszfeld (RFA; nu, iters)
- ``centered_clip``: centered clipping around the previous aggregate (tau, iters)
- ``norm_bound``: per-update norm bounding, fixed or adaptive; the one streaming rule

All but ``norm_bound`` hold the round's K updates (K x model bytes) and spill them to a memory-mapped file
above ``spill_mb``. docs/robust-aggregation.md has the guarantees, weighting and costs.
"""

from fedfleet.robust.base import RobustCombiner
from fedfleet.robust.bulyan import Bulyan
from fedfleet.robust.centered_clip import CenteredClip
from fedfleet.robust.geomedian import GeometricMedian
from fedfleet.robust.krum import Krum
from fedfleet.robust.median import Median
from fedfleet.robust.norm_bound import NormBound
from fedfleet.robust.stack import UpdateStack
from fedfleet.robust.trimmed_mean import TrimmedMean

__all__ = [
    "Bulyan",
    "CenteredClip",
    "GeometricMedian",
    "Krum",
    "Median",
    "NormBound",
    "RobustCombiner",
    "TrimmedMean",
    "UpdateStack",
]
