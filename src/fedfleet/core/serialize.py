"""(De)serialisation of params with safetensors: named tensors in their own dtype, no pickle.

Metadata (a str -> str map) travels in the safetensors header, e.g. the round number of a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from fedfleet.core.params import FlatParams, ParamSpec


def params_to_bytes(params: FlatParams, metadata: dict[str, str] | None = None) -> bytes:
    return save(_contiguous(params), metadata=metadata)


def params_from_bytes(data: bytes, spec: ParamSpec | None = None, device: str = "cpu") -> FlatParams:
    return _to_flat(load(data), spec, device)


def save_params(params: FlatParams, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a reader never sees a half-written file (write, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_contiguous(params), str(tmp), metadata=metadata)
    fsync_replace(tmp, path)


def load_params(path: str | Path, spec: ParamSpec | None = None, device: str = "cpu") -> FlatParams:
    return _to_flat(load_file(str(path), device=device), spec, device)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def fsync_replace(tmp: Path, path: Path) -> None:
    """fsync the file, rename it over the target, fsync the directory: the commit point of a checkpoint."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _contiguous(params: FlatParams) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; these views are small headers, the copy is per tensor
    return {name: t.contiguous().clone() if t.numel() else t.clone() for name, t in params.tensors().items()}


def _to_flat(named: dict[str, torch.Tensor], spec: ParamSpec | None, device: str) -> FlatParams:
    if spec is None:
        return FlatParams.from_tensors(named, device=device)
    missing = [n for n in spec.names if n not in named]
    extra = [n for n in named if n not in spec]
    if missing or extra:
        raise ValueError(f"params do not match the spec: missing {missing[:5]}, unexpected {extra[:5]}")
    flat = FlatParams.zeros(spec, device)
    views = flat.tensors()
    for name, t in named.items():
        if tuple(t.shape) != spec[name].shape or t.dtype != spec[name].dtype:
            raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {spec[name].shape} {spec[name].dtype}")
        views[name].copy_(t)
    return flat
