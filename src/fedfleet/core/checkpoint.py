"""Server checkpoints: global params, strategy state, round, virtual clock, history and the state of stateful
parts (the selector's memory of clients, rows clients keep locally) in ONE safetensors file.

A part's state (``snap["parts"][name]``) is a flat dict of arrays (stored as tensors) and JSON values (stored in
the metadata); it comes back with every array as a CPU tensor.

Written atomically (temp file, fsync, rename, fsync of the folder): after a crash the file is either the
previous committed round or the new one, never a mix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedfleet.core.params import FlatParams
from fedfleet.core.serialize import fsync_replace
from fedfleet.errors import UserError

FORMAT = "fedfleet-checkpoint-1"


class CheckpointMismatchError(UserError):
    """The checkpoint was written for another model or strategy."""


def save_checkpoint(path: str | Path, snap: dict[str, Any]) -> None:
    path = Path(path)
    tensors = {f"global/{k}": v.clone() for k, v in snap["global"].tensors().items()}
    for key, params in snap["state"].items():
        tensors.update({f"state/{key}/{k}": v.clone() for k, v in params.tensors().items()})
    meta = {k: snap[k] for k in ("round", "sim_time", "seed")}
    values: dict[str, dict[str, Any]] = {}
    for part, state in snap.get("parts", {}).items():
        values[part] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor | np.ndarray):
                tensors[f"part/{part}/{key}"] = _tensor(value)
            else:
                values[part][key] = value
    metadata = {
        "format": FORMAT,
        "meta": json.dumps(meta),
        "history": json.dumps(snap.get("history", [])),
        "parts": json.dumps(values),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    fsync_replace(tmp, path)


def load_checkpoint(path: str | Path, global_like: FlatParams, state_like: dict[str, FlatParams]) -> dict[str, Any]:
    """The snapshot dict ``RoundLoop.restore`` takes, checked against the running job's layout."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CheckpointMismatchError(f"{path} is not a fedfleet checkpoint (format {metadata.get('format')!r})")
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    snap: dict[str, Any] = json.loads(metadata["meta"])
    snap["history"] = json.loads(metadata.get("history", "[]"))
    snap["global"] = _fill(global_like, stored, "global/", path)
    snap["state"] = {key: _fill(like, stored, f"state/{key}/", path) for key, like in state_like.items()}
    parts: dict[str, dict[str, Any]] = json.loads(metadata.get("parts", "{}"))
    for name, tensor in stored.items():
        if name.startswith("part/"):
            part, key = name[len("part/") :].split("/", 1)
            parts.setdefault(part, {})[key] = tensor
    snap["parts"] = parts
    return snap


def _tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).clone()
    return value.detach().cpu().contiguous().clone()


def _fill(like: FlatParams, stored: dict, prefix: str, path: Path) -> FlatParams:
    out = like.zeros_like()
    for name, view in out.tensors().items():
        tensor = stored.get(prefix + name)
        if tensor is None or tensor.shape != view.shape or tensor.dtype != view.dtype:
            found = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise CheckpointMismatchError(
                f"checkpoint {path} was written for a different model or strategy: {prefix}{name} is {found}, "
                f"expected {tuple(view.shape)} {view.dtype}; start a new run (--overwrite) or resume the right one"
            )
        view.copy_(tensor)
    return out
