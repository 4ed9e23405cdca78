"""FedBuff's buffer: a running, staleness-scaled sum of the deltas that arrived since the last server step.

    mean = sum_k scale_k * delta_k / sum_k weight_k      (see ``async_staleness.arrival_factor``)

Streaming like ``core.aggregate.WeightedMean``: one model-sized sum whatever the buffer size, and the
arriving delta is folded at once (its slot is reused by the next client dispatched).
"""

from __future__ import annotations

from fedfleet.core.aggregate import MetricMean
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate


class StalenessBuffer:
    def __init__(self, like: FlatParams) -> None:
        self._sum = like.zeros_like()
        self._weight = 0.0
        self._count = 0
        self._metrics = MetricMean()

    def __len__(self) -> int:
        return self._count

    def add(self, delta: FlatParams, scale: float, weight: float, metrics: dict[str, float]) -> None:
        if not weight > 0 or not scale >= 0:
            raise ValueError(f"an arrival needs weight > 0 and scale >= 0, got weight {weight} and scale {scale}")
        self._sum.add_(delta, alpha=float(scale))
        self._weight += float(weight)
        self._count += 1
        self._metrics.add(metrics, float(weight))

    def finish(self) -> Aggregate:
        """The buffer's mean as the strategy's server step expects it (``params`` is a delta)."""
        if self._count == 0:
            raise ValueError("the buffer is empty: nothing to apply")
        self._sum.mul_(1.0 / self._weight)
        return Aggregate(self._sum, self._weight, self._count, self._metrics.means())
