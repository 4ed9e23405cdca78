"""metrics.jsonl (one object per round, appended) and metrics.csv (one row per round) in the run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedfleet.core.loop import Callback, RoundLoop, RoundRecord


class MetricsFileCallback(Callback):
    def __init__(self, directory: str | Path) -> None:
        self.jsonl = Path(directory) / "metrics.jsonl"
        self.csv = Path(directory) / "metrics.csv"
        self._rows: list[dict[str, float]] = []
        self._columns: dict[str, None] = {"round": None}  # an ordered set: a new key costs O(1), not O(columns)

    def on_run_start(self, loop: RoundLoop) -> None:
        # the loop's (possibly restored) history is the truth: rows past it belong to an interrupted round
        self._rows = [{"round": r.round + 1, **r.metrics} for r in loop.history]
        self._columns = {"round": None}
        for row in self._rows:
            self._add_columns(row)
        self.jsonl.write_text("".join(json.dumps(row) + "\n" for row in self._rows))
        self._write_csv()

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        row = {"round": record.round + 1, **record.metrics}  # 1-based, as in the table and TensorBoard
        self._rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._add_columns(row):
            self._write_csv()  # a new metric (e.g. the first evaluation): rewrite with the wider header
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, list(self._columns)).writerow(row)

    def _add_columns(self, row: dict) -> bool:
        new = [k for k in row if k not in self._columns]
        self._columns.update(dict.fromkeys(new))
        return bool(new)

    def _write_csv(self) -> None:
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, list(self._columns))
            writer.writeheader()
            writer.writerows(self._rows)
