"""Checkpoint the server every k rounds, after the last round, and when the run is interrupted."""

from __future__ import annotations

from pathlib import Path

from fedfleet.core.checkpoint import load_checkpoint, save_checkpoint
from fedfleet.core.loop import Callback, RoundLoop, RoundRecord

FILENAME = "checkpoint.safetensors"


class CheckpointCallback(Callback):
    def __init__(self, directory: str | Path, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        self.path = Path(directory) / FILENAME
        self.every = every
        self._saved_round = -1

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        if loop.round % self.every == 0 or loop.round == loop.config.rounds:
            self._save(loop)

    def on_run_end(self, loop: RoundLoop, status: str) -> None:
        if status in ("interrupted", "stopped", "failed") and loop.round > 0:
            self._save(loop)  # keep the last completed round, whatever the schedule

    def _save(self, loop: RoundLoop) -> None:
        if self._saved_round != loop.round:
            save_checkpoint(self.path, loop.snapshot())
            self._saved_round = loop.round


def resume(loop: RoundLoop, directory: str | Path) -> bool:
    """Restore ``loop`` from ``directory``'s checkpoint; False when there is none."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        return False
    loop.restore(load_checkpoint(path, loop.global_params, loop.state))
    return True
