"""Pickles of plain data only: FedScale's trace files are pickles, and ``pickle.load`` runs whatever code a
file names. Every callable a pickle can invoke (to rebuild an object) is looked up through ``find_class``;
this unpickler admits only the few that rebuild plain data (NumPy scalars and dtypes, ordered dicts, sets),
so a file that names anything else (``os.system``, ``builtins.eval``, a class) is refused before it runs.
Dicts, lists, tuples, strings and numbers need no lookup at all.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

ALLOWED = {
    ("numpy.core.multiarray", "scalar"),  # a NumPy scalar from its dtype and bytes
    ("numpy._core.multiarray", "scalar"),  # the same in NumPy 2
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a callable that is not plain data (it could run code)."""


class PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise RefusedPickle(f"it names {module}.{name}, which is not plain data (a pickle can run code)")
        return super().find_class(module, name)


def load_plain(path: str | Path, max_bytes: int = 1 << 30) -> Any:
    """The plain data a pickle file holds; ``RefusedPickle`` when it names anything else."""
    data = Path(path).read_bytes() if Path(path).stat().st_size <= max_bytes else None
    if data is None:
        raise RefusedPickle(f"it is larger than {max_bytes >> 20} MiB")
    return PlainDataUnpickler(io.BytesIO(data)).load()
