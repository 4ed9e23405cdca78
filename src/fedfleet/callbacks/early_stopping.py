"""Stop when a metric has not improved for ``patience`` evaluations."""

from __future__ import annotations

import logging
import math

from fedfleet.core.loop import Callback, RoundLoop, RoundRecord

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    def __init__(self, metric: str = "test_accuracy", mode: str = "max", patience: int = 10, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"early_stopping.mode must be 'max' or 'min', got {mode!r}")
        if patience < 1:
            raise ValueError(f"early_stopping.patience must be >= 1, got {patience}")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best = -math.inf if mode == "max" else math.inf
        self.waited = 0

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        value = record.metrics.get(self.metric)
        if value is None:  # rounds without an evaluation do not count
            return
        better = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if better:
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            log.warning(
                "early stopping: %s has not improved on %.4g for %d evaluations", self.metric, self.best, self.patience
            )
            loop.request_stop()
