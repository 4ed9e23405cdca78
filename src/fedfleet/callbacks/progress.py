"""A progress bar over rounds (or FedBuff's server steps) and one table row for each (plain lines when the output
is not a terminal)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedfleet.core.loop import Callback, RoundLoop, RoundRecord

WIDTH = 12


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return ""
    if "accuracy" in key:
        return f"{value:.2%}"
    if key.endswith("_s"):
        return f"{value:.1f}"
    return f"{value:.4f}"


class ProgressCallback(Callback):
    def __init__(
        self,
        console: Console | None = None,
        columns: Sequence[str] = ("train_loss", "test_loss", "test_accuracy", "sim_time_s"),
    ) -> None:
        self.console = console or Console(stderr=False)
        self.columns = tuple(columns)
        self._progress: Progress | None = None
        self._task = None

    def on_run_start(self, loop: RoundLoop) -> None:
        unit = "step" if loop.unit == "server step" else loop.unit  # FedBuff: one row per server step
        header = unit.rjust(6) + "".join(c.rjust(WIDTH + 2) for c in self.columns)
        self.console.print(header, style="bold", highlight=False)
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._task = self._progress.add_task(f"{unit}s", total=loop.config.rounds, completed=loop.round)
            self._progress.start()

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        cells = "".join(_fmt(c, record.metrics.get(c)).rjust(WIDTH + 2) for c in self.columns)
        self.console.print(f"{record.round + 1:>6}{cells}", highlight=False)
        if self._progress is not None:
            self._progress.update(self._task, completed=loop.round)

    def on_run_end(self, loop: RoundLoop, status: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
