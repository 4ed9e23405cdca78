"""How many examples a batch holds, whatever shape the user's DataModule gives it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor found in ``batch`` (a tensor, tuple, list or dict).

    Raises ``ValueError`` when there is none: pass ``batch_size_fn`` to the callback for such batches,
    since a guess would skew the weighted mean.
    """
    found = _first_tensor(batch)
    if found is None:
        raise ValueError(
            f"cannot tell the number of examples in a batch of type {type(batch).__name__}; give "
            f"FedLightningCallback(batch_size_fn=lambda batch: ...) so syncs are weighted by examples"
        )
    return int(found.shape[0])


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_loss(outputs: Any) -> float | None:
    """The training loss of a batch from what ``training_step`` returned (a tensor or ``{"loss": ...}``)."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None
