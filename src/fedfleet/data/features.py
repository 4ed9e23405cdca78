"""The column layout of tabular inputs with categorical features (click-through data, DLRM).

Such a dataset still has one float32 tensor ``x`` of shape (N, F), so every partitioner, runtime and
transport handles it unchanged: the first ``len(dense)`` columns are real-valued features, the rest are
category ids stored as floats (exact below 2**24). Models that embed categories (DLRM) read the layout
from ``Dataset.features``; models that do not (an MLP) just see numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fedfleet.errors import DataError

MAX_EXACT_ID = 2**24  # float32 holds every integer up to here exactly


@dataclass(frozen=True)
class FeatureLayout:
    dense: tuple[str, ...]  # names of the real-valued columns, in order, first in x
    sparse: tuple[str, ...]  # names of the categorical columns, after the dense ones
    cardinalities: tuple[int, ...]  # number of categories of each sparse feature (ids 0 .. card - 1)

    def __post_init__(self) -> None:
        if len(self.sparse) != len(self.cardinalities):
            raise DataError(f"{len(self.sparse)} sparse features but {len(self.cardinalities)} cardinalities")
        if len(set(self.dense + self.sparse)) != len(self.dense) + len(self.sparse):
            raise DataError("feature names must be unique")
        bad = [n for n, c in zip(self.sparse, self.cardinalities, strict=True) if not 1 <= c <= MAX_EXACT_ID]
        if bad:
            raise DataError(f"sparse features {bad} need 1 to {MAX_EXACT_ID} categories to be stored as floats")

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    @property
    def width(self) -> int:
        """Columns of ``x``."""
        return len(self.dense) + len(self.sparse)

    def check(self, x: Tensor) -> None:
        """The ids in ``x`` are whole numbers inside each feature's range (one vectorised pass)."""
        if x.dim() != 2 or x.shape[1] != self.width:
            raise DataError(f"the feature layout has {self.width} columns but x has shape {tuple(x.shape)}")
        ids = x[:, self.num_dense :]
        if len(ids) == 0 or ids.shape[1] == 0:
            return
        upper = ids.new_tensor(self.cardinalities)
        if bool((ids != ids.floor()).any()) or bool((ids < 0).any()) or bool((ids >= upper).any()):
            raise DataError(f"sparse columns of x must hold category ids 0 .. cardinality - 1 of {self.sparse}")
