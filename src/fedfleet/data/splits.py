"""How a dataset holds out its test set. One function each, registered; a dataset names its own (``split``).

Image datasets hold out a share of each class. Interaction data (ratings, clicks) holds out a share of
each *user's* interactions, as FedScale does: every user stays a client with training data, and the
test set asks how well the model predicts a known user's other interactions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfleet.errors import DataError
from fedfleet.registry import Registry

if TYPE_CHECKING:
    from fedfleet.data.datasets import Dataset

SplitFn = Callable[[Any, float, np.random.Generator], np.ndarray]  # -> boolean test mask
SPLITS: Registry[SplitFn] = Registry("split")


def _grouped(groups: np.ndarray, fraction: float, rng: np.random.Generator, pick_last: bool) -> np.ndarray:
    """A test mask with ``round(n_g * fraction)`` members of each group g: random ones, or the last ones.

    Vectorised: one sort gives every sample its rank inside its group (943 users or 100,000 do not matter).
    """
    _, group = np.unique(groups, return_inverse=True)
    # random order, then stable sort by group: within a group the order is random (or the data's own)
    tiebreak = np.arange(len(group)) if pick_last else rng.permutation(len(group))
    order = tiebreak[np.argsort(group[tiebreak], kind="stable")]
    sizes = np.bincount(group)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group)) - np.repeat(starts, sizes)
    take = np.rint(sizes * fraction).astype(np.int64)  # same rounding as Python's round (half to even)
    first_test = sizes - take if pick_last else np.zeros_like(sizes)
    return (rank >= first_test[group]) & (rank < first_test[group] + take[group])


@SPLITS.register("stratified")
def stratified(dataset: Dataset, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each class contributes ``fraction`` of its samples, chosen at random."""
    labels = dataset.y.cpu().numpy()
    test_mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_mask[members[: round(len(members) * fraction)]] = True
    return test_mask


@SPLITS.register("per_user")
def per_user(dataset: Dataset, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each user (key) contributes ``fraction`` of its interactions, chosen at random."""
    return _grouped(_keys(dataset), fraction, rng, pick_last=False)


@SPLITS.register("per_user_latest")
def per_user_latest(dataset: Dataset, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each user's latest ``fraction`` of interactions (the dataset keeps each user's rows in time order)."""
    return _grouped(_keys(dataset), fraction, rng, pick_last=True)


def _keys(dataset: Dataset) -> np.ndarray:
    if dataset.keys is None:
        raise DataError(f"dataset {dataset.name!r} has no user keys, so it cannot be split per user")
    return np.asarray(dataset.keys)


def train_test_split(dataset: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded split by the dataset's own rule (``dataset.split``): stratified by class unless it says otherwise."""
    rng = np.random.default_rng(seed)
    test_mask = SPLITS.get(dataset.split)(dataset, test_fraction, rng)
    return dataset.subset(np.flatnonzero(~test_mask)), dataset.subset(np.flatnonzero(test_mask))
