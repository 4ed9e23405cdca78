"""Label flipping: an attacker trains honestly on wrong labels (class c becomes C - 1 - c, or c + shift mod C),
so its update points the model at a consistent wrong mapping; a data attack, subtler than a sign flip.

The flip is in the data, not the update: the simulation applies ``poison`` to the attacking clients' rows of
the federation once, when the job is assembled (each client's rows are its own, a contiguous range); the update
transform only marks who attacks (``attacker: 1``) like the other behaviours. Simulation only: a deployed party
owns its data, and an attack there is whatever that party chooses to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.attacks.base import Attack
from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import Update


@dataclass(frozen=True, kw_only=True)
class LabelFlip(Attack):
    shift: int | None = None  # None: c -> C - 1 - c; an int k: c -> (c + k) mod C

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shift is not None and (isinstance(self.shift, bool) or not isinstance(self.shift, int)):
            raise ValueError(f"shift must be a whole number, got {self.shift!r}")

    def flipped(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.shift is None:
            return num_classes - 1 - y
        return (y + self.shift) % num_classes

    def poison(self, federation) -> int:
        """Flip the labels of every attacking client's rows in ``federation`` (in place); returns how many."""
        if federation.y.dtype.is_floating_point:
            raise ValueError("label_flip needs class labels; this dataset's targets are real numbers")
        count = 0
        for client in range(federation.num_clients):
            if self.attacks(client):
                rows = federation.client(client).y  # a view of the client's own range
                rows.copy_(self.flipped(rows, federation.num_classes))
                count += 1
        return count

    def corrupt(self, update: Update, context: TransformContext) -> Update:
        return update  # the harm is in what it trained on
