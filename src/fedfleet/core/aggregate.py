"""Streaming aggregation: a running weighted sum, so server memory is O(model) for any number of updates.

An aggregator folds updates one at a time (``add``), folds another aggregator's partial result of the same
kind (``merge``: a Ray worker's share of the cohort, a sub-arbiter's parties) and ends the round
(``finish``). Merging partials gives the fold of all their updates, so a runtime may aggregate where the
updates are and move one model-sized partial instead of one update per client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update


class Aggregator(Protocol):
    def add(self, update: Update) -> None:
        """Fold one update now (its params buffer may be reused once this returns)."""

    def merge(self, other: Aggregator) -> None:
        """Fold ``other``, an unfinished aggregator of the same kind and round, as if its updates were added."""

    def finish(self) -> Aggregate:
        """The round's aggregate; the aggregator is spent."""


class MetricMean:
    """Weighted running means of the scalar metrics clients report."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + weight * float(value)
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def merge(self, other: MetricMean) -> None:
        for key, value in other._sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._weights[key] = self._weights.get(key, 0.0) + other._weights[key]

    def means(self) -> dict[str, float]:
        return {k: s / self._weights[k] for k, s in self._sums.items() if self._weights[k] > 0}


class WeightedMean:
    """sum_k w_k * x_k / sum_k w_k, folded one update at a time (one fused multiply-add per dtype)."""

    # what FedBuff asks of a strategy's aggregator: that it is this weighted mean, so folding the arrivals with
    # staleness-scaled weights instead keeps the strategy's meaning (any aggregator may declare it)
    weighted_mean: ClassVar[bool] = True

    def __init__(self, like: FlatParams) -> None:
        self._sum = like.zeros_like()
        self._weight = 0.0
        self._count = 0
        self._metrics = MetricMean()

    def add(self, update: Update) -> None:
        self.add_same(update.params, [update])

    def add_same(self, params: FlatParams, updates: Sequence[Update]) -> None:
        """``add`` of each of ``updates``, which all carry ``params`` (their own are not read): one multiply-add
        with their total weight where ``add`` would make one each. A secure round's survivors all carry its
        unmasked mean."""
        weights = [float(u.weight) for u in updates]
        if any(w < 0 for w in weights):
            raise ValueError(f"update weights must be >= 0, got {weights}")
        total = sum(weights)
        self._sum.add_(params, alpha=total)
        self._weight += total
        self._count += len(updates)
        for update, weight in zip(updates, weights, strict=True):
            self._metrics.add(shown(update), weight)

    def merge(self, other: Aggregator) -> None:
        other = _same_kind(self, other)
        self._sum.add_(other._sum)
        self._weight += other._weight
        self._count += other._count
        self._metrics.merge(other._metrics)

    def finish(self) -> Aggregate:
        if self._count == 0 or self._weight <= 0:
            raise ValueError("no update with positive weight to aggregate")
        self._sum.mul_(1.0 / self._weight)
        return Aggregate(self._sum, self._weight, self._count, self._metrics.means())


def _same_kind(mine: object, other: object) -> Any:
    """``other`` if it is the same kind of aggregator as ``mine`` (a partial of another kind cannot merge)."""
    if type(other) is not type(mine):
        raise TypeError(f"cannot merge a {type(other).__name__} into a {type(mine).__name__}")
    return other


def shown(update: Update) -> dict[str, float]:
    """What the round's table averages of an update: its metrics and its typed stats."""
    return {**update.metrics, **update.stats.as_metrics()}
