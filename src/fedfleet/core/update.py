"""What a party sends back after local training, and what the arbiter folds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedfleet.core.params import FlatParams


@dataclass(frozen=True)
class TrainStats:
    """Protocol facts of one party's local training, typed (never read from metric keys). Each may be unknown.

    ``samples``: examples processed (epochs x data): the virtual clock's compute load. ``loss``: the mean
    training loss. ``loss_sq``: the mean squared per-example loss (Oort's statistical utility is its root).
    ``initial_loss``: the loss at the global params before training (q-FedAvg's F_k).
    """

    samples: float | None = None
    loss: float | None = None
    loss_sq: float | None = None
    initial_loss: float | None = None

    # how each fact is shown beside the metrics (the round's table prefixes "train_" where missing)
    DISPLAY: ClassVar[dict[str, str]] = {
        "samples": "samples",
        "loss": "train_loss",
        "loss_sq": "train_loss_sq",
        "initial_loss": "initial_loss",
    }

    def as_metrics(self) -> dict[str, float]:
        return {shown: float(v) for name, shown in self.DISPLAY.items() if (v := getattr(self, name)) is not None}

    def check(self) -> str | None:
        """Why these facts cannot be trusted (non-finite, a negative count or square), or None."""
        for name in self.DISPLAY:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{name} is {value!r}, not a finite number"
            if name in ("samples", "loss_sq") and value < 0:
                return f"{name} is {value}, below 0"
        return None

    def to_wire(self) -> dict[str, float]:
        return {name: float(v) for name in self.DISPLAY if (v := getattr(self, name)) is not None}

    @classmethod
    def from_wire(cls, fields: object) -> TrainStats:
        """From a message's ``stats`` (a party's own words): unknown names are an error, values checked apart."""
        if not isinstance(fields, dict):
            raise ValueError(f"stats must be a mapping, got {type(fields).__name__}")
        unknown = set(fields) - set(cls.DISPLAY)
        if unknown:
            raise ValueError(f"unknown stats {sorted(unknown)}; known: {sorted(cls.DISPLAY)}")
        return cls(**fields)


NO_STATS = TrainStats()


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
    metrics: dict[str, float] = field(default_factory=dict)  # shown in the round's table, never read as protocol
    client_id: int | str = -1
    is_delta: bool = True
    stats: TrainStats = NO_STATS


@dataclass
class Aggregate:
    """The result of folding a round's updates: what the strategy's server step consumes."""

    params: FlatParams  # usually the weighted mean of the deltas
    weight: float  # total weight folded
    count: int  # number of updates folded
    metrics: dict[str, float] = field(default_factory=dict)  # weighted means of client metrics
    extra: dict[str, float] = field(default_factory=dict)  # strategy-specific scalars (e.g. q-FedAvg's h)
    overhead_s: float = 0.0  # virtual seconds the aggregation itself added (secure aggregation's exchanges)


@dataclass(frozen=True)
class Report:
    """What the loop learns of one folded update besides its params: for the virtual clock and the selector."""

    client_id: int | str
    weight: float
    metrics: dict[str, float]
    stats: TrainStats = NO_STATS


@dataclass
class Partial:
    """Updates a runtime folded where they were trained (a Ray worker's share): an unfinished aggregator of the
    round's kind, which the loop's aggregator merges, and one report per update it holds."""

    aggregator: Any
    reports: list[Report]
