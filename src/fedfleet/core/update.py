"""What a party sends back after local training, and what the arbiter folds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedfleet.core.params import FlatParams


@dataclass
class Update:
    """A party's contribution to one round.

    ``params`` is a delta (local - global) when ``is_delta`` (the default: deltas aggregate and compress
    better), otherwise the local params. ``weight`` is usually the number of examples trained on.
    In simulation the runtime may reuse the ``params`` buffer for the next client once ``add`` returns,
    so aggregators must fold it immediately and never keep a reference.
    """

    params: FlatParams
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    client_id: int | str = -1
    is_delta: bool = True


@dataclass
class Aggregate:
    """The result of folding a round's updates: what the strategy's server step consumes."""

    params: FlatParams  # usually the weighted mean of the deltas
    weight: float  # total weight folded
    count: int  # number of updates folded
    metrics: dict[str, float] = field(default_factory=dict)  # weighted means of client metrics
    extra: dict[str, float] = field(default_factory=dict)  # strategy-specific scalars (e.g. q-FedAvg's h)


@dataclass(frozen=True)
class Report:
    """What the loop learns of one folded update besides its params: for the virtual clock and the selector."""

    client_id: int | str
    weight: float
    metrics: dict[str, float]


@dataclass
class Partial:
    """Updates a runtime folded where they were trained (a Ray worker's share): an unfinished aggregator of the
    round's kind, which the loop's aggregator merges, and one report per update it holds."""

    aggregator: Any
    reports: list[Report]
