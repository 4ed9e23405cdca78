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
    ``"secure"`` (SecAgg+: the arbiter learns only the weighted sum; FATE-LLM's ``"secure_aggregate"`` is
    the same and is stored as ``"secure"``). Every party of a session must say the same."""

    aggregate_strategy: Literal["epoch", "step"] = "epoch"
    aggregate_freq: int | float = 1
    aggregator: Literal["plain", "secure", "secure_aggregate"] = "plain"

    def __post_init__(self) -> None:
        if self.aggregate_strategy not in ("epoch", "step"):
            raise ConfigError(f"aggregate_strategy must be 'epoch' or 'step', got {self.aggregate_strategy!r}")
        if self.aggregator == "secure_aggregate":  # FATE-LLM's name
            object.__setattr__(self, "aggregator", "secure")
        if self.aggregator not in ("plain", "secure"):
            raise ConfigError(
                f"aggregator must be 'plain' or 'secure' (FATE-LLM: 'secure_aggregate'), got {self.aggregator!r}"
            )
        freq = self.aggregate_freq
        if isinstance(freq, bool) or not isinstance(freq, (int, float)) or freq <= 0:
            raise ConfigError(f"aggregate_freq must be a positive number, got {freq!r}")
        fraction = isinstance(freq, float) and not freq.is_integer()
        if fraction and (self.aggregate_strategy == "epoch" or freq >= 1):
            raise ConfigError(
                f"aggregate_freq={freq}: a fraction is only meaningful with aggregate_strategy='step' and below 1"
            )

    @property
    def secure(self) -> bool:
        return self.aggregator == "secure"

    def sync_steps(self, total_steps: int, steps_per_epoch: int, start: int = 0) -> tuple[int, ...]:
        """The optimizer steps after which a party syncs, ascending; the last is always the run's end.

        Every ``aggregate_freq`` epochs or steps; a fraction ``f`` syncs after each ``f`` of the run
        (``0.25`` of 18 steps: after steps 5, 9, 14 and 18), so the count is exact even when ``f * total``
        is not a whole number. Steps at or before ``start`` (a resumed run) are already behind.
        """
        if total_steps < 1:
            raise ConfigError(f"a federated run needs at least one optimizer step, got max_steps={total_steps}")
        freq = self.aggregate_freq
        if self.aggregate_strategy == "step" and isinstance(freq, float) and not freq.is_integer():
            points = {math.ceil(k * freq * total_steps - 1e-9) for k in range(1, math.ceil(1 / freq) + 1)}
        else:
            every = max(1, int(freq) * (steps_per_epoch if self.aggregate_strategy == "epoch" else 1))
            points = set(range(every, total_steps, every))
        points = {p for p in points if 0 < p < total_steps} | {total_steps}
        return tuple(sorted(p for p in points if p > start))


def steps_text(steps: tuple[int, ...], shown: int = 6) -> str:
    """A schedule for a log line: ``5, 9, 14, 18`` or ``10, 20, ... 400``."""
    head = ", ".join(map(str, steps[:shown]))
    return head if len(steps) <= shown else f"{head}, ... {steps[-1]}"
