"""Name -> factory tables, so that adding a strategy, model or dataset is a file plus one line.

Every registry raises :class:`fedfleet.errors.ConfigError` for an unknown name, listing the names it knows
and the closest match, because a typo in a YAML file is the usual way to get here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedfleet.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """A table of named entries of one kind ("strategy", "model", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@STRATEGIES.register("fedavg")``."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        key = name.lower()
        if key in self._entries and self._entries[key] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[key] = entry

    def get(self, name: str) -> T:
        """An entry by name, or by import path ``package.module:attribute`` for users' own code."""
        if ":" in name:
            return _import_entry(name, self.kind)
        key = name.lower()
        if key not in self._entries:
            known = sorted(self._entries)
            raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(key, known)}; known: {', '.join(known)}")
        return self._entries[key]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _import_entry(path: str, kind: str):
    import importlib

    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{kind} {path!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    if not hasattr(module, attr):
        raise ConfigError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def construct(
    factory: Callable[..., T], params: dict, what: str, signature_of: Callable | None = None, skip: int = 0
) -> T:
    """Call ``factory(**params)``, turning an unknown or missing keyword into a ConfigError that names it.

    Works for dataclasses and plain functions alike (it reads the signature), so every registry entry gets
    the same "unknown key 'lrr' for strategy fedavg (did you mean 'lr'?)" message. ``signature_of`` and
    ``skip`` describe a wrapped function whose first ``skip`` parameters the caller supplies itself.
    """
    import inspect

    sig = inspect.signature(signature_of or factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    known = [n for n, p in list(sig.parameters.items())[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not accepts_any:
        for key in params:
            if key not in known:
                raise ConfigError(
                    f"unknown key {key!r} for {what}{did_you_mean(key, known)}; valid keys: {', '.join(known)}"
                )
    try:
        return factory(**params)
    except TypeError as exc:  # a missing required argument
        raise ConfigError(f"{what}: {exc}") from None
    except ValueError as exc:  # the entry validated a value
        raise ConfigError(f"{what}: {exc}") from None
