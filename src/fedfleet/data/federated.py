"""The federated dataset: every virtual client is an index range into tensors already on the device.

The samples are reordered once so that each client's are contiguous; ``client(i)`` is then two slices
(no copy), and registering 100,000 clients costs one offsets array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Partition:
    """Sample indices grouped by client: client i owns ``order[offsets[i]:offsets[i + 1]]``."""

    order: np.ndarray  # int64, a permutation (or subset) of sample indices
    offsets: np.ndarray  # int64, num_clients + 1, non-decreasing, offsets[0] == 0

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def client(self, i: int) -> np.ndarray:
        return self.order[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class ClientData:
    """One client's examples: views into the federation's tensors.

    ``client_id`` tells a trainer whose data this is, so state that never leaves a client (personal
    embedding rows, ``client.keep_local``) can follow it across rounds in a simulation.
    """

    x: Tensor
    y: Tensor
    client_id: int | None = None

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> ClientData:
        return ClientData(self.x.to(device), self.y.to(device), self.client_id)


class FederatedDataset:
    def __init__(self, x: Tensor, y: Tensor, offsets: Tensor, num_classes: int) -> None:
        if len(x) != len(y) or int(offsets[-1]) != len(y):
            raise ValueError("x, y and offsets disagree on the number of samples")
        self.x = x
        self.y = y
        self.offsets = offsets
        self._bounds = offsets.tolist()  # Python ints: client(i) costs two slices, no tensor indexing
        self.num_classes = num_classes

    @classmethod
    def from_partition(
        cls, x: Tensor, y: Tensor, partition: Partition, num_classes: int | None = None
    ) -> FederatedDataset:
        order = torch.from_numpy(np.ascontiguousarray(partition.order, dtype=np.int64))
        offsets = torch.from_numpy(np.ascontiguousarray(partition.offsets, dtype=np.int64))
        classes = int(y.max()) + 1 if num_classes is None else num_classes
        return cls(x[order], y[order], offsets, classes)

    @property
    def num_clients(self) -> int:
        return len(self._bounds) - 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def client(self, i: int) -> ClientData:
        start, end = self._bounds[i], self._bounds[i + 1]
        return ClientData(self.x[start:end], self.y[start:end], i)

    def sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str) -> FederatedDataset:
        if self.x.device == torch.device(device):
            return self
        return FederatedDataset(self.x.to(device), self.y.to(device), self.offsets, self.num_classes)

    def __repr__(self) -> str:
        return f"FederatedDataset({self.num_clients} clients, {len(self.y)} samples, x {tuple(self.x.shape[1:])})"
