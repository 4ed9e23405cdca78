"""The run folder ``<output.dir>/<name>/``: config, metrics, TensorBoard events, checkpoint, status.

``status.json`` says what the folder holds (running, finished, interrupted, failed), so a crashed or
interrupted run never looks like a finished one, and re-running a name never silently overwrites results.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedfleet.core.serialize import fsync_replace
from fedfleet.errors import ConfigError

STATUS = "status.json"
CHECKPOINT = "checkpoint.safetensors"
# everything a run writes in its folder (the callbacks' files and the final model): all --overwrite removes
RUN_FILES = frozenset(
    {STATUS, CHECKPOINT, "config.yaml", "metrics.csv", "metrics.jsonl", "model.safetensors", "result.json", "tb"}
)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def prepare(cls, base: str | Path, name: str, *, resume: bool = False, overwrite: bool = False) -> RunDir:
        path = Path(base) / name
        run = cls(path)
        status = run.status()
        if resume:
            if (path / CHECKPOINT).is_file():
                return run
            # nothing committed yet (a crash before round 1 ended, or a first start): --resume starts the run,
            # so a supervisor that always restarts with --resume does not loop on an error
            if path.exists() and any(path.iterdir()) and not (path / STATUS).is_file():
                raise ConfigError(f"--resume: {path} holds no checkpoint and is not a fedfleet run folder")
            if (path / STATUS).is_file():
                run.clear()
            print(f"--resume: nothing committed in {path} yet; starting from round 1", file=sys.stderr)
            path.mkdir(parents=True, exist_ok=True)
            return run
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                state = status.get("state", "unknown")
                hint = "--resume to continue it, " if (path / CHECKPOINT).is_file() and state != "finished" else ""
                raise ConfigError(
                    f"{path} already holds a run ({state}); pass {hint}--overwrite to replace it, "
                    f"or --set name=<another name>"
                )
            run.clear()
        path.mkdir(parents=True, exist_ok=True)
        return run

    def clear(self) -> None:
        """``--overwrite``: remove what a run wrote, and only that. A folder without ``status.json`` was never a
        run (a user's own folder named like one) and is refused; files a run does not write are kept."""
        if not (self.path / STATUS).is_file():
            raise ConfigError(
                f"{self.path} is not a fedfleet run folder (it has no {STATUS}), so --overwrite will not delete "
                f"anything in it; choose another output.dir or --set name=<another name>"
            )
        for entry in self.path.iterdir():
            written = entry.name in RUN_FILES or entry.name.removesuffix(".tmp").lstrip(".") in RUN_FILES
            if not written:
                continue  # not a run's: the user's
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATUS).read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, state: str, **info: Any) -> None:
        self.write_json(STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
        fsync_replace(tmp, self.path / name)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT
