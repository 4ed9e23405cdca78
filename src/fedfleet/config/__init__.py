"""Typed job configuration, parsed once at the edge from YAML (plus ``--set`` overrides)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedfleet.config.imports import import_user_modules
from fedfleet.config.loader import Named, apply_overrides, parse, read_yaml
from fedfleet.config.schema import (
    ClientConfig,
    DataConfig,
    EarlyStoppingConfig,
    JobConfig,
    NetworkConfig,
    OutputConfig,
    RuntimeConfig,
)


def load_job(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job file (or start from the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    if isinstance(data.get("imports"), list):  # the user's modules register the models and datasets it names
        import_user_modules(data["imports"], near=path)
    return parse(JobConfig, data)


def to_dict(config: Any) -> Any:
    """The config as plain YAML-able data (named sections flattened back to ``{name: ..., **params}``)."""
    if isinstance(config, Named):
        return {"name": config.name, **config.params}
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    return config


__all__ = [
    "ClientConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "JobConfig",
    "Named",
    "NetworkConfig",
    "OutputConfig",
    "RuntimeConfig",
    "load_job",
    "parse",
    "to_dict",
]
