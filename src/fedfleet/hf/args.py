"""``FedArguments``: when a party synchronises and how its update is aggregated (FATE-LLM's names)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedfleet.errors import ConfigError


@dataclass(frozen=True)
class FedArguments:
    """``aggregate_strategy``: sync at the end of every ``aggregate_freq`` epochs (``"epoch"``) or every
    ``aggregate_freq`` optimizer steps (``"step"``). For steps, a float in (0, 1) is a fraction of the run's
    total steps (``0.25``: four syncs). ``aggregator``: ``"plain"`` (the arbiter sees each update) or
    ``"secure"`` (masked; arrives with the secure-aggregation work)."""

    aggregate_strategy: Literal["epoch", "step"] = "epoch"
    aggregate_freq: int | float = 1
    aggregator: Literal["plain", "secure"] = "plain"

    def __post_init__(self) -> None:
        if self.aggregate_strategy not in ("epoch", "step"):
            raise ConfigError(f"aggregate_strategy must be 'epoch' or 'step', got {self.aggregate_strategy!r}")
        if self.aggregator == "secure":
            raise ConfigError(
                "aggregator='secure' is not available yet: secure aggregation arrives with its own work item; "
                "use aggregator='plain' (updates are still sent over mutual TLS)"
            )
        if self.aggregator != "plain":
            raise ConfigError(f"aggregator must be 'plain' or 'secure', got {self.aggregator!r}")
        freq = self.aggregate_freq
        if isinstance(freq, bool) or not isinstance(freq, (int, float)) or freq <= 0:
            raise ConfigError(f"aggregate_freq must be a positive number, got {freq!r}")
        fraction = isinstance(freq, float) and not freq.is_integer()
        if fraction and (self.aggregate_strategy == "epoch" or freq >= 1):
            raise ConfigError(
                f"aggregate_freq={freq}: a fraction is only meaningful with aggregate_strategy='step' and below 1"
            )

    def interval(self, epochs: int, total_steps: int, steps_per_epoch: int) -> int:
        """Optimizer steps between syncs."""
        freq = self.aggregate_freq
        if self.aggregate_strategy == "epoch":
            return max(1, int(freq) * steps_per_epoch)
        if isinstance(freq, float) and not freq.is_integer():
            return max(1, round(freq * total_steps))
        return int(freq)

    def rounds(self, epochs: int, total_steps: int, steps_per_epoch: int) -> int:
        """How many syncs a run of ``total_steps`` makes (the last one at the end of training)."""
        return math.ceil(total_steps / self.interval(epochs, total_steps, steps_per_epoch))
