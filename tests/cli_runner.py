"""The ``fedfleet`` command line in its own process, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def fedfleet(*args: str, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedfleet.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
