"""``fedfleet list``: what is registered, so users can see the names a job file may use."""

from __future__ import annotations

from fedfleet.errors import ConfigError
from fedfleet.registry import did_you_mean


def _tables() -> dict:
    from fedfleet.data import DATASETS, PARTITIONERS
    from fedfleet.models import MODELS
    from fedfleet.select import SELECTORS
    from fedfleet.strategy import STRATEGIES
    from fedfleet.transforms import FOLD_TRANSFORMS, PARTY_TRANSFORMS

    return {
        "strategies": STRATEGIES,
        "selectors": SELECTORS,
        "models": MODELS,
        "datasets": DATASETS,
        "partitioners": PARTITIONERS,
        "client-transforms": PARTY_TRANSFORMS,
        "server-transforms": FOLD_TRANSFORMS,
    }


def list_command(kind: str | None) -> int:
    tables = _tables()
    if kind is not None and kind not in tables:
        raise ConfigError(f"unknown kind {kind!r}{did_you_mean(kind, list(tables))}; known: {', '.join(tables)}")
    for name, registry in tables.items():
        if kind in (None, name):
            print(f"{name}: {', '.join(registry.names())}")
    return 0
