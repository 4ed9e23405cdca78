"""The user's own modules, imported before a job is built: where a FedScale user edits ``fllibs.py``, a fedfleet
user writes a module that registers models and datasets (``@MODELS.register``, ``@DATASETS.register``) and
names it in the job file (``imports: [my_models]``) or on the command line (``--import my_models``).

A module is looked up on ``sys.path`` and in the job file's folder (added to ``sys.path`` and ``PYTHONPATH``,
so Ray workers and party processes started from here find it too). Importing runs the module's code, as
editing ``fllibs.py`` does in FedScale: read a job file you did not write before you run it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from fedfleet.errors import ConfigError

MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def import_user_modules(names: Iterable[str], near: str | Path | None = None) -> list[str]:
    """Import each module in ``names`` (dotted names, e.g. ``my_models`` or ``lab.models``); ``near``: a job file
    whose folder is searched too. Returns the names imported; a name that cannot be imported is a ConfigError."""
    names = list(names)
    if not names:
        return []
    if near is not None:
        _add_to_path(Path(near).resolve().parent)
    _add_to_path(Path.cwd())
    for name in names:
        if not isinstance(name, str) or not MODULE_RE.fullmatch(name):
            raise ConfigError(
                f"imports: {name!r} is not a module name; give dotted names such as my_models (for my_models.py "
                f"next to the job file), not paths"
            )
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name or name.startswith(f"{exc.name}."):  # the module itself, not one it imports
                where = (
                    "the job file's folder, the current folder or sys.path"
                    if near
                    else "the current folder or sys.path"
                )
                raise ConfigError(f"imports: no module {name!r} in {where}") from None
            raise ConfigError(f"imports: {name} imports {exc.name!r}, which is not installed") from None
        except Exception as exc:  # the user's module failed: its own error, named
            raise ConfigError(f"imports: importing {name} failed: {type(exc).__name__}: {exc}") from exc
    return names


def _add_to_path(folder: Path) -> None:
    entry = str(folder)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if entry not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([entry, *parts])
