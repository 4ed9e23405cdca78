"""What a model's output means, read from its shape: the default loss and the evaluation metrics.

    (N, C > 1) logits, integer labels -> "classes": cross-entropy; accuracy
    (N, 1) logit, integer labels 0/1  -> "logit":   binary cross-entropy; AUC, log loss, accuracy
    anything else                      -> "other":   cross-entropy (as before); the loss only

One logit with BCE is the click-through standard (DLRM); two logits with softmax would learn the same
thing with twice the head. Adding a kind is a row in ``LOSSES`` and ``METRICS``, not a branch in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def output_kind(out: Tensor, y: Tensor) -> str:
    """The key of ``LOSSES`` and ``METRICS`` for a batch of outputs and labels (shapes only: vmap-safe)."""
    if out.dim() != 2 or y.is_floating_point():
        return "other"
    return "logit" if out.shape[1] == 1 else "classes"


def output_widths(num_classes: int) -> tuple[int, ...]:
    """Output sizes a model may have for a dataset of ``num_classes`` classes (two: also one logit)."""
    return (num_classes, 1) if num_classes == 2 else (num_classes,)


# -- losses -----------------------------------------------------------------------------------------
def _cross_entropy(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    return F.cross_entropy(out, y, reduction=reduction)


def _binary_logit(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    return F.binary_cross_entropy_with_logits(out.squeeze(1), y.to(out.dtype), reduction=reduction)


LOSSES: dict[str, Callable[[Tensor, Tensor, str], Tensor]] = {
    "classes": _cross_entropy,
    "logit": _binary_logit,
    "other": _cross_entropy,
}


class OutputLoss(nn.Module):
    """The trainer's default loss: cross-entropy for class logits, BCE for one logit.

    Has ``reduction`` like torch's loss modules, so the cohort-vectorised runtime can ask for per-sample losses.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return LOSSES[output_kind(out, y)](out, y, self.reduction)


# -- metrics ----------------------------------------------------------------------------------------
class Metric(Protocol):
    """Accumulates over evaluation batches; ``result`` gives named values (an empty dict if undefined)."""

    def update(self, out: Tensor, y: Tensor) -> None: ...

    def result(self) -> dict[str, float]: ...


class Accuracy:
    def __init__(self) -> None:
        self.correct, self.count = 0, 0

    def update(self, out: Tensor, y: Tensor) -> None:
        self.correct += int((out.argmax(dim=1) == y).sum())
        self.count += len(y)

    def result(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.count} if self.count else {}


class ClickMetrics:
    """AUC (exact, over all examples), log loss and accuracy at p = 0.5 of a one-logit model.

    AUC needs every score at once, so the logits are kept: 4 bytes per example, on the device.
    """

    def __init__(self) -> None:
        self.logits: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, out: Tensor, y: Tensor) -> None:
        self.logits.append(out.detach().squeeze(1))
        self.labels.append(y)

    def result(self) -> dict[str, float]:
        if not self.logits:
            return {}
        logits, labels = torch.cat(self.logits).double(), torch.cat(self.labels)
        metrics = {
            "log_loss": float(F.binary_cross_entropy_with_logits(logits, labels.double())),
            "accuracy": float(((logits > 0) == (labels == 1)).double().mean()),
        }
        auc = roc_auc(logits, labels)
        if auc is not None:  # undefined when the examples are all clicks or all non-clicks
            metrics["auc"] = auc
        return metrics


class LossOnly:
    """Outputs of no known kind (regression, sequences): the trainer reports the loss alone."""

    def update(self, out: Tensor, y: Tensor) -> None:
        pass

    def result(self) -> dict[str, float]:
        return {}


METRICS: dict[str, Callable[[], Metric]] = {"classes": Accuracy, "logit": ClickMetrics, "other": LossOnly}


def roc_auc(scores: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve by ranks (Mann-Whitney U): exact, tied scores get their average rank.

    AUC = (sum of the positives' ranks - P(P+1)/2) / (P * N). One sort, O(n log n); ``None`` if P or N is 0.
    """
    scores, positive = scores.detach().flatten().double(), labels.flatten() == 1
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ordered, order = torch.sort(scores)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    average_rank = ends - (counts.double() - 1) / 2  # mean of ranks ends - counts + 1 .. ends
    rank_sum = float(average_rank[group][positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
