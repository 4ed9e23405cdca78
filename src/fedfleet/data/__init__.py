"""Datasets, partitioners and the federated dataset (clients as index ranges)."""

from fedfleet.data import csv_table as _csv_table  # noqa: F401  (registers the csv dataset)
from fedfleet.data import movielens as _movielens  # noqa: F401  (registers the movielens_ctr dataset)
from fedfleet.data.datasets import DATASETS, Dataset, from_tensors, load_dataset
from fedfleet.data.features import FeatureLayout
from fedfleet.data.federated import ClientData, FederatedDataset, Partition
from fedfleet.data.partition import PARTITIONERS, partition
from fedfleet.data.splits import SPLITS, train_test_split


def federate(
    dataset: Dataset, clients: int | None = 100, scheme: str = "dirichlet", seed: int = 0, **params: object
) -> FederatedDataset:
    """Split a dataset over virtual clients: ``federate(train, clients=100, scheme="dirichlet", alpha=0.5)``."""
    labels = dataset.keys if scheme == "natural" else dataset.y.cpu().numpy()
    parts = partition(scheme, labels, clients, seed, **params)
    return FederatedDataset.from_partition(dataset.x, dataset.y, parts, dataset.num_classes)


__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "SPLITS",
    "ClientData",
    "Dataset",
    "FeatureLayout",
    "FederatedDataset",
    "Partition",
    "federate",
    "from_tensors",
    "load_dataset",
    "partition",
    "train_test_split",
]
