"""Robust aggregation rules (``fedfleet.robust``) as fold transforms: one registration each.

Every rule but ``norm_bound`` holds the round's updates (K x model bytes, spilled above ``spill_mb``) and is
not mergeable: an explicit opt-in, ``fedfleet list server-transforms`` says so beside each name.
"""

from fedfleet.robust import Bulyan, CenteredClip, GeometricMedian, Krum, Median, NormBound, TrimmedMean
from fedfleet.transforms.base import FOLD_TRANSFORMS

FOLD_TRANSFORMS.add("median", Median)
FOLD_TRANSFORMS.add("trimmed_mean", TrimmedMean)
FOLD_TRANSFORMS.add("krum", Krum)
FOLD_TRANSFORMS.add("bulyan", Bulyan)
FOLD_TRANSFORMS.add("geomedian", GeometricMedian)
FOLD_TRANSFORMS.add("centered_clip", CenteredClip)
FOLD_TRANSFORMS.add("norm_bound", NormBound)
