"""TensorBoard scalars: every numeric round metric, with the round number (1-based) as the step."""

from __future__ import annotations

from pathlib import Path

from fedfleet.core.loop import Callback, RoundLoop, RoundRecord


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None

    def on_run_start(self, loop: RoundLoop) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self._writer = SummaryWriter(str(self.log_dir))

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        for key, value in record.metrics.items():
            self._writer.add_scalar(key, value, record.round + 1)
        self._writer.flush()

    def on_run_end(self, loop: RoundLoop, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
