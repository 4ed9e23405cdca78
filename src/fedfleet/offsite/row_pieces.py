"""Cutting a large matrix (an embedding table) into row pieces under numbered keys, and joining them back.

FATE-LLM's Offsite-Tuning tutorial shares GPT-2's token embedding as ten pieces (``wte0`` ... ``wte9``) from
``get_additional_param_state_dict`` and joins them in ``load_additional_param_state_dict``; its helpers for that
are ``split_numpy_array`` and ``recover_numpy_array``, so the same names are kept here. They take and return
torch tensors or numpy arrays alike (a piece of a tensor is a view: nothing is copied until it is sent).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedfleet.errors import ConfigError


def split_rows(matrix: Any, pieces: int, prefix: str) -> dict[str, Any]:
    """``{prefix0: rows, prefix1: rows, ...}``: ``matrix`` cut along its first axis into ``pieces`` parts whose
    sizes differ by at most one row."""
    if pieces < 1:
        raise ConfigError(f"split into at least one piece, got {pieces}")
    rows = len(matrix)
    if pieces > rows:
        raise ConfigError(f"cannot cut {rows} rows into {pieces} pieces")
    edges = np.linspace(0, rows, pieces + 1).round().astype(int)
    return {f"{prefix}{i}": matrix[edges[i] : edges[i + 1]] for i in range(pieces)}


def join_rows(pieces: Mapping[str, Any], prefix: str) -> Any:
    """The matrix :func:`split_rows` cut: the ``prefix<i>`` entries of ``pieces`` in order (other keys ignored);
    every index from 0 up must be there."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)")
    numbered = {int(m.group(1)): value for key, value in pieces.items() if (m := pattern.fullmatch(key))}
    if not numbered:
        raise ConfigError(f"no pieces named {prefix}0, {prefix}1, ... among {sorted(pieces)[:5]}")
    missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if missing:
        raise ConfigError(f"pieces {', '.join(f'{prefix}{i}' for i in missing)} are missing")
    parts = [numbered[i] for i in range(len(numbered))]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    return np.concatenate([p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else p for p in parts], axis=0)


def split_numpy_array(matrix: Any, pieces: int, suffix: str) -> dict[str, Any]:
    """FATE-LLM's name for :func:`split_rows` (its third argument is the key prefix, which FATE calls suffix).
    As FATE's, it also takes the module's state dict ``{"weight": matrix}`` (what ``get_numpy_state_dict`` gives
    for an embedding) and cuts its weight."""
    if isinstance(matrix, Mapping):
        if set(matrix) != {"weight"}:
            raise ConfigError(f"split_numpy_array takes a matrix or {{'weight': matrix}}, got keys {sorted(matrix)}")
        matrix = matrix["weight"]
    return split_rows(matrix, pieces, suffix)


def recover_numpy_array(pieces: Mapping[str, Any], suffix: str = "") -> Any:
    """FATE-LLM's name for :func:`join_rows`. It returns the matrix (FATE's returns ``{"weight": matrix}``); both
    load with ``load_numpy_state_dict``, which takes a bare matrix for a one-param module such as an embedding."""
    return join_rows(pieces, suffix)
