"""Which aggregators let a Ray worker fold its clients' updates into one partial sum before sending them.

An aggregator qualifies when its result depends on the updates' params only through sum_k w_k * params_k
(besides each update's weight, metrics and id): then moving params between updates while keeping every
weight changes nothing, and a worker may send its whole share's weighted sum riding on one of its updates
(see ``RayRuntime``). FedAvg's :class:`WeightedMean` does; q-FedAvg's aggregator does not (it weighs each
delta by a power of that client's own loss and sums each delta's squared norm), so its workers send one
delta per client.

This is a table of exact types, not a check of ``isinstance``: a subclass may fold differently (clip,
reject outliers) and is treated as not qualifying until it is added here.
"""

from __future__ import annotations

from typing import Any

from fedfleet.core.aggregate import WeightedMean

WEIGHTED_SUM_AGGREGATORS: set[type] = {WeightedMean}


def folds_weighted_sum(aggregator: Any) -> bool:
    """Whether ``aggregator`` needs only the weighted sum of the updates' params (see the module's doc)."""
    return type(aggregator) in WEIGHTED_SUM_AGGREGATORS
