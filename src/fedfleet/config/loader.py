"""Parse plain dicts (from YAML) into frozen dataclasses, once, at the edge.

Every problem becomes a :class:`ConfigError` that names the full key path (``client.lr``), what is wrong and
the fix, before any work starts: unknown keys (with a did-you-mean), wrong types, values a dataclass's
``__post_init__`` rejects. Any dataclass works, wherever it is defined: fields typed with scalars, ``Literal``,
unions, lists, ``tuple[X, ...]`` and fixed-length tuples (``tuple[str, str]``), dicts, :class:`Named`,
:data:`Identifier` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import yaml

from fedfleet.config.fedscale_keys import fedfleet_override
from fedfleet.config.safe_yaml import load_yaml
from fedfleet.errors import ConfigError
from fedfleet.registry import did_you_mean

T = TypeVar("T")

_IDENTIFIER = "identifier"
#: A string that YAML may read as a number (``party_id: 9999``): a whole number is taken as its digits.
Identifier = Annotated[str, _IDENTIFIER]


@dataclasses.dataclass(frozen=True)
class Named:
    """A ``{name: ..., <params>}`` section: an entry of a registry plus its keyword parameters.

    The params are checked against the registered entry's signature by the code that builds it.
    """

    name: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse(cls: type[T], data: Any, where: str = "", *, source: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (a dict), recursively, with precise errors.

    ``where`` is the key path of ``data`` inside a larger config; ``source`` (the file ``data`` was read from)
    starts every message, for a job made of several files.
    """
    here = where or source or "the job"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{here}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # every problem of the file at once (a job with three mistakes should not take three runs to learn them)
    problems = [
        f"{_join(where, str(key))}: unknown key{did_you_mean(str(key), list(fields))}; "
        f"valid keys here: {', '.join(fields)}"
        for key in data
        if key not in fields
    ]
    kwargs = {}
    for key, value in data.items():
        if key in fields:
            try:
                kwargs[key] = _convert(hints[key], value, _join(where, key))
            except ConfigError as exc:
                problems.extend(str(exc).split(PROBLEMS_SEP))
    problems += [f"{here}: missing required key {n!r}" for n, f in fields.items() if _key_missing(n, f, data)]
    if problems:
        raise ConfigError(_from(source, PROBLEMS_SEP.join(problems)))
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as exc:  # a __post_init__ check
        raise ConfigError(f"{here}: {exc}") from None


def load(cls: type[T], path: str | Path) -> T:
    """:func:`parse` the YAML file ``path`` into ``cls``; every error names the file."""
    return parse(cls, read_yaml(path), source=str(path))


PROBLEMS_SEP = "\n  "  # problems after the first, one per line


def _key_missing(name: str, f: dataclasses.Field, data: dict) -> bool:
    return name not in data and _required(f)


def _from(source: str, message: str) -> str:
    return f"{source}: {message}" if source else message


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        if _IDENTIFIER in hint.__metadata__ and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return _convert(args[0], value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # the value's own type first: `threshold: 4` under `float | int` stays the count 4, not the fraction 4.0
        options.sort(key=lambda a: a is not type(value))
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if hint is Named:
        return _named(value, where)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[str, int]
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        return origin(_convert(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typing.get_origin(hint) is typing.Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(hint)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    return value


def _named(value: Any, where: str) -> Named:
    if isinstance(value, str):
        return Named(value)
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{where}: expected a name or a mapping with a 'name' key, got {value!r}")
    params = {k: v for k, v in value.items() if k != "name"}
    if not isinstance(value["name"], str):
        raise ConfigError(f"{where}.name: expected a string, got {value['name']!r}")
    return Named(value["name"], params)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set client.lr=0.05 --set strategy.name=fedyogi``: dotted keys, values parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set client.lr=0.05")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        fedfleet = fedfleet_override(key.strip(), raw.strip()) if len(parts) == 1 else None
        if fedfleet is not None and parts[0] not in data:
            raise ConfigError(f"--set {key}: {key} is a FedScale key, and --set takes fedfleet keys: --set {fedfleet}")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str):  # a short-form named section such as `strategy: fedavg`
                child = node[part] = {"name": child}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = load_yaml(raw) if raw else ""
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} does not exist; see examples/ for job files to start from")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the job must be a mapping of keys (name:, data:, model:, ...)")
    return data
