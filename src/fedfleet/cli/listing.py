"""``fedfleet list``: what is registered, so users can see the names a job file may use."""

from __future__ import annotations

import inspect

from fedfleet.errors import ConfigError
from fedfleet.registry import Registry, did_you_mean


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
            if kind == name:
                for line in _details(registry):
                    print(line)
    return 0


def _details(registry: Registry) -> list[str]:
    """One line per entry that states what it holds in memory (the robust aggregators: K x model or O(model))."""
    entries = [(n, registry.get(n)) for n in registry.names()]
    described = [(n, e) for n, e in entries if isinstance(getattr(e, "memory", None), str)]
    width = max((len(n) for n, _ in described), default=0)
    lines = []
    for name, entry in described:
        summary = (entry.__doc__ or "").strip().splitlines()[0] if entry.__doc__ else ""
        keys = ", ".join(inspect.signature(entry).parameters)
        pad = " " * (width + 4)
        lines += [f"  {name:<{width}}  {summary}".rstrip(), f"{pad}keys: {keys}", f"{pad}memory: {entry.memory}"]
    return lines
