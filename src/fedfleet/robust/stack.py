"""A round's updates as the rows of one (K, D) matrix, for the rules that need every update at once.

D is every exchanged element in the layout's order (one dtype buffer after another), stored as float32
(float64 when the layout holds float64 tensors): a rule reads a block of columns of every update as one
(K, c) tensor. Memory: K x D x 4 bytes. Above ``spill_mb`` the rows go to a raw file in a temporary folder
the stack creates (and deletes when it is closed), read back through a numpy memory map, so the arbiter
holds only the block it is working on. Both ways read the same blocks, so a rule gives bit for bit the same
result in RAM and spilled.

An update is checked before it is kept: its layout (names, shapes, dtypes), finite values and its weight.
A refused one is counted by reason and never folded.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedfleet.core.params import FlatParams, ParamSpec, spec_difference
from fedfleet.core.update import Update

BLOCK_BYTES = 32 << 20  # a (K, c) block of the rows stays near this (as float64): bounded RAM, big vector ops
REFUSALS = ("layout", "nonfinite", "weight")  # why an update was not kept (the round's robust_refused_* keys)


def refusal(update: Update, spec: ParamSpec) -> str | None:
    """Why ``update`` cannot be folded into a round of layout ``spec`` (a key of REFUSALS), or None."""
    if update.params.spec != spec:
        return "layout"
    for dtype, n in spec.sizes.items():
        buf = update.params.buffers.get(dtype)
        if buf is None or buf.dim() != 1 or buf.numel() != n or buf.dtype != dtype:
            return "layout"
    w = update.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        return "weight"
    if not update.params.isfinite():
        return "nonfinite"
    return None


def describe(update: Update, reason: str, spec: ParamSpec) -> str:
    """A line for the log: what was wrong with a refused update."""
    if reason == "layout":
        return f"its params do not match the model: {spec_difference(spec, update.params.spec)}"
    if reason == "weight":
        return f"its weight {update.weight!r} is not a finite number >= 0"
    return "its params hold NaN or inf"


class UpdateStack:
    """The round's accepted updates: rows (in arrival order), their weights and client ids."""

    def __init__(self, like: FlatParams, spill_mb: float = 1024.0, spill_dir: str | None = None) -> None:
        self.spec: ParamSpec = like.spec
        self.device = like.device
        self.dtype = torch.float64 if torch.float64 in like.spec.sizes else torch.float32
        self.dim = like.spec.numel
        self.spill_bytes = spill_mb * 2**20
        self.spill_dir = spill_dir
        self.weights: list[float] = []
        self.ids: list[int | str] = []
        self.refused = dict.fromkeys(REFUSALS, 0)
        self._rows: list[Tensor] = []  # in RAM, until spilled
        self._file: Path | None = None  # the spilled rows, appended one after another
        self._folder: str | None = None
        self._map: np.memmap | None = None
        self._cleanup: weakref.finalize | None = None

    # -- keeping updates -----------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return len(self.weights)

    @property
    def row_bytes(self) -> int:
        return self.dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def add(self, update: Update) -> str | None:
        """Keep a copy of ``update`` (its buffer may be reused once this returns); the refusal reason, or None."""
        reason = refusal(update, self.spec)
        if reason is not None:
            self.refused[reason] += 1
            return reason
        row = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        start = 0
        for dtype, n in self.spec.sizes.items():
            row[start : start + n].copy_(update.params.buffers[dtype])
            start += n
        if not self.spilled and (self.k + 1) * self.row_bytes > self.spill_bytes:
            self._spill()
        if self.spilled:
            self._append(row)
        else:
            self._rows.append(row)
        self.weights.append(float(update.weight))
        self.ids.append(update.client_id)
        return None

    def _spill(self) -> None:
        """Move the rows held so far to a file and keep appending there: RAM stays O(block)."""
        self._folder = tempfile.mkdtemp(prefix="fedfleet-robust-", dir=self.spill_dir)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)  # even if never closed
        self._file = Path(self._folder) / "rows.bin"
        self._file.touch()
        for row in self._rows:
            self._append(row)
        self._rows = []

    def _append(self, row: Tensor) -> None:
        assert self._file is not None
        with self._file.open("ab") as f:
            row.cpu().numpy().tofile(f)
        self._map = None  # the file grew: map it again when read

    # -- reading blocks -------------------------------------------------------------------------------
    def block_size(self, rows: int) -> int:
        """Columns per block for ``rows`` rows; the same in RAM and spilled, so results are identical."""
        return max(1024, BLOCK_BYTES // (8 * max(rows, 1)))

    def blocks(self, rows: Sequence[int] | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """(start, stop, X) over the columns: X is the (len(rows), stop - start) block of the given rows (all by
        default), in the storage dtype, on the model's device."""
        index = list(range(self.k)) if rows is None else [int(r) for r in rows]
        step = self.block_size(len(index))
        for start in range(0, self.dim, step):
            stop = min(start + step, self.dim)
            yield start, stop, self._block(index, start, stop)

    def _block(self, index: list[int], start: int, stop: int) -> Tensor:
        if not self.spilled:
            return torch.stack([self._rows[i][start:stop] for i in index])
        if self._map is None:
            dtype = np.float64 if self.dtype == torch.float64 else np.float32
            self._map = np.memmap(self._file, dtype=dtype, mode="r", shape=(self.k, self.dim))
        rows = self._map[index, start:stop] if index != list(range(self.k)) else self._map[:, start:stop]
        # a copy only where the slice is a read-only view of the map (fancy indexing has copied already)
        return torch.from_numpy(np.require(rows, requirements=["C", "W"])).to(self.device)

    # -- one-pass reductions the rules share (float64 sums) --------------------------------------------
    def gram(self) -> Tensor:
        """(K, K) inner products of the rows, float64, one pass."""
        g = torch.zeros(self.k, self.k, dtype=torch.float64, device=self.device)
        for _, _, x in self.blocks():
            xd = x.double()
            g.addmm_(xd, xd.T)
        return g

    def sq_distances(self) -> Tensor:
        """(K, K) squared L2 distances between the rows, float64, from the Gram matrix (one pass)."""
        g = self.gram()
        n = g.diagonal()
        return (n[:, None] + n[None, :] - 2 * g).clamp_min_(0).fill_diagonal_(0)

    def distances_to(self, point: Tensor) -> Tensor:
        """(K,) L2 distance of each row to ``point`` (a (D,) vector), one pass. Each block's norms are taken in
        the storage dtype (13x faster than in float64, and exact to ~1e-6, plenty to rank or weight updates);
        the blocks' squares add up in float64."""
        acc = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        for start, stop, x in self.blocks():
            acc += torch.linalg.vector_norm(x - point[start:stop], dim=1).double().square()
        return acc.sqrt()

    def combine(self, coeffs: Tensor, rows: Sequence[int] | None = None) -> Tensor:
        """sum_k coeffs[k] * row_k over the given rows (all by default), as a (D,) vector of the storage dtype:
        one matrix-vector product per block (a sum of K terms: no float64 needed)."""
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        c = coeffs.to(device=self.device, dtype=self.dtype)
        for start, stop, x in self.blocks(rows):
            torch.mv(x.T, c, out=out[start:stop])
        return out

    def write(self, vector: Tensor, into: FlatParams) -> FlatParams:
        """Copy a (D,) vector into ``into``'s dtype buffers (the aggregate), in the layout's order."""
        start = 0
        for dtype, n in self.spec.sizes.items():
            into.buffers[dtype].copy_(vector[start : start + n])
            start += n
        return into

    def vector(self, params: FlatParams) -> Tensor:
        """``params`` (the model's layout) as a (D,) vector of the storage dtype."""
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        start = 0
        for dtype, n in self.spec.sizes.items():
            out[start : start + n].copy_(params.buffers[dtype])
            start += n
        return out

    def close(self) -> None:
        """Drop the rows; a spilled stack deletes its folder."""
        self._rows, self._map = [], None
        if self._cleanup is not None:
            self._cleanup()  # runs shutil.rmtree once
        self._file = self._folder = None
