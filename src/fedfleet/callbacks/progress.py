"""A progress bar over rounds (or FedBuff's server steps) and one table row for each (plain lines when the output
is not a terminal).

A column may be ``OneOf`` several metrics: the first of them, in its order, that a round reports is the one shown
from then on (a click model's test AUC rather than its accuracy, which sits at the majority rate whatever it
learns). Which one a task reports is known only once it is evaluated, so the header names ``until_seen`` until then
and is printed again if another one appears; the rows before that have no such metric to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedfleet.core.loop import Callback, RoundLoop, RoundRecord

WIDTH = 12


class OneOf(NamedTuple):
    """A column showing the first of ``names`` that the rounds report; ``until_seen`` heads it before any is."""

    names: tuple[str, ...]
    until_seen: str


Column = str | OneOf


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
        columns: Sequence[Column] = ("train_loss", "test_loss", "test_accuracy", "sim_time_s"),
    ) -> None:
        self.console = console or Console(stderr=False)
        self._pending = {i: c for i, c in enumerate(columns) if isinstance(c, OneOf)}  # not yet decided
        self.columns = tuple(c.until_seen if isinstance(c, OneOf) else c for c in columns)  # what the header shows
        self._unit = "round"
        self._progress: Progress | None = None
        self._task = None

    def on_run_start(self, loop: RoundLoop) -> None:
        self._unit = "step" if loop.unit == "server step" else loop.unit  # FedBuff: one row per server step
        self._print_header()
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
            self._task = self._progress.add_task(f"{self._unit}s", total=loop.config.rounds, completed=loop.round)
            self._progress.start()

    def _print_header(self) -> None:
        header = self._unit.rjust(6) + "".join(c.rjust(WIDTH + 2) for c in self.columns)
        self.console.print(header, style="bold", highlight=False)

    def _decide(self, metrics: dict[str, float]) -> None:
        """Fix each undecided column on the first of its names these metrics hold; a changed header is reprinted."""
        columns = list(self.columns)
        for i, column in list(self._pending.items()):
            seen = next((name for name in column.names if name in metrics), None)
            if seen is not None:
                columns[i] = seen
                del self._pending[i]
        if tuple(columns) != self.columns:
            self.columns = tuple(columns)
            self._print_header()

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        self._decide(record.metrics)
        cells = "".join(_fmt(c, record.metrics.get(c)).rjust(WIDTH + 2) for c in self.columns)
        self.console.print(f"{record.round + 1:>6}{cells}", highlight=False)
        if self._progress is not None:
            self._progress.update(self._task, completed=loop.round)

    def on_run_end(self, loop: RoundLoop, status: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
