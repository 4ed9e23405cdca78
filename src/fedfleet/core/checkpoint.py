"""Server checkpoints: global params, strategy state, round, virtual clock, history and the state of stateful
parts (the selector's memory of clients, rows clients keep locally) in ONE safetensors file.

A part's state (``snap["parts"][name]``) is a flat dict of arrays (stored as tensors) and JSON values (stored in
the metadata); it comes back with every array as a CPU tensor.

Written atomically (temp file, fsync, rename, fsync of the folder): after a crash the file is either the
previous committed round or the new one, never a mix. A SHA-256 of every stored tensor travels in the
metadata, and loading checks it and the bookkeeping (round, clock, history), so a truncated, damaged or
edited checkpoint is a clear error (exit 2) instead of a traceback or a silently different resumed run.
"""

from __future__ import annotations

import hashlib
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


class CheckpointDamagedError(UserError):
    """The checkpoint cannot be read, or its contents are not what was written."""


_FRESH = "resume from a good copy, or start the run again with --overwrite"


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
        "sha256": _digest(tensors),
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
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointMismatchError(
                    f"{path} is not a fedfleet checkpoint (format {metadata.get('format')!r})"
                )
            stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        snap: dict[str, Any] = json.loads(metadata["meta"])
        snap["history"] = json.loads(metadata.get("history", "[]"))
        parts: dict[str, dict[str, Any]] = json.loads(metadata.get("parts", "{}"))
    except CheckpointMismatchError:
        raise
    except Exception as exc:  # truncated, empty, garbled: safetensors and json fail in many ways
        raise CheckpointDamagedError(f"checkpoint {path} cannot be read ({_first_line(exc)}); {_FRESH}") from None
    expected = metadata.get("sha256")
    if expected is not None and expected != _digest(stored):
        raise CheckpointDamagedError(f"checkpoint {path} does not match its own SHA-256 (damaged or edited); {_FRESH}")
    _check_bookkeeping(snap, path)
    snap["global"] = _fill(global_like, stored, "global/", path)
    snap["state"] = {key: _fill(like, stored, f"state/{key}/", path) for key, like in state_like.items()}
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


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_bookkeeping(snap: dict[str, Any], path: Path) -> None:
    """The round, clock and history a resumed run continues from must be ones a run can have written."""
    rnd, sim_time, history = snap.get("round"), snap.get("sim_time", 0.0), snap.get("history")
    problems = []
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        problems.append(f"round {rnd!r} is not a count of committed rounds")
    if isinstance(sim_time, bool) or not isinstance(sim_time, (int, float)) or not 0 <= sim_time < float("inf"):
        problems.append(f"the virtual clock {sim_time!r} is not a time")
    if not isinstance(history, list) or not all(
        isinstance(r, dict) and isinstance(r.get("round"), int) for r in history
    ):
        problems.append("its history is not a list of round records")
    elif isinstance(rnd, int) and [r["round"] for r in history] != list(range(rnd - len(history), rnd)):
        problems.append(f"its history's rounds {[r['round'] for r in history][:5]} do not end at round {rnd}")
    if problems:
        raise CheckpointDamagedError(f"checkpoint {path}: {'; '.join(problems)}; {_FRESH}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
