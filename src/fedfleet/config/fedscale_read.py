"""Reading a FedScale conf.yml: its top level, its ``job_conf:`` list as one mapping, the keys neither FedScale nor
fedfleet knows, and which fedfleet keys its ``fedfleet:`` section sets itself (``fedscale.py`` translates the rest).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedfleet.config import fedscale_keys as keys
from fedfleet.config.safe_yaml import load_yaml
from fedfleet.errors import ConfigError
from fedfleet.registry import did_you_mean


def read_conf(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"FedScale job file {str(path)!r} does not exist (FedScale keeps them in benchmark/configs/)")
    try:
        conf = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{path}: a FedScale job file is a mapping with a job_conf: list, got {type(conf).__name__}")
    top = {*keys.TOP_LEVEL_IGNORED, "job_conf", keys.EXTENSION}
    unknown = [str(k) for k in conf if k not in top]
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level keys {_with_hints(unknown, sorted(top))}; job settings belong in the "
            f"job_conf: list, fedfleet-only ones in a `fedfleet:` section"
        )
    return conf


def is_fedscale_file(path: str | Path) -> bool:
    """Whether a job file is FedScale's (a mapping with a job_conf: list) rather than fedfleet's."""
    file = Path(path)
    try:
        conf = load_yaml(file.read_text()) if file.is_file() else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False  # fedfleet's loader reports what is wrong with it
    return isinstance(conf, dict) and isinstance(conf.get("job_conf"), list)


def job_conf_of(conf: dict[str, Any], path: Path) -> dict[str, Any]:
    """``job_conf: [{key: value}, ...]`` as one ordered mapping; a repeated key keeps its last value, as in FedScale."""
    entries = conf.get("job_conf")
    if entries is None:
        raise ConfigError(f"{path}: no job_conf: list; FedScale's job settings are a list like `- rounds: 100`")
    if isinstance(entries, dict):  # a mapping is the same thing written differently
        entries = [entries]
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: job_conf must be a list of `- key: value` entries, got {entries!r}")
    merged: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: job_conf entry {i + 1} ({entry!r}) is not a `key: value` pair")
        for key, value in entry.items():
            merged.pop(str(key), None)  # keep the position of the value that counts
            merged[str(key)] = value
    return merged


def unknown_keys(job_conf: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Keys of neither FedScale's config_parser.py nor fedfleet's tables, as (key, reason) for the report: FedScale
    ignores them too (its own copy of the DLRM guide has `n_rows:`), so they are a warning with a did-you-mean."""
    known = keys.known_keys()
    return [
        (str(key), f"not a FedScale key{did_you_mean(str(key), known)}; ignored, as FedScale does")
        for key in job_conf
        if key not in known
    ]


def replaced_sections(extension: Any) -> frozenset[str]:
    """The dotted keys a `fedfleet:` section gives (``data.dataset``, ...), one level deep."""
    if not isinstance(extension, dict):
        return frozenset()
    found = set()
    for section, value in extension.items():
        found.add(str(section))
        if isinstance(value, dict):
            found.update(f"{section}.{key}" for key in value)
    return frozenset(found)


def _with_hints(names: list[str], known: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return ", ".join(parts)
