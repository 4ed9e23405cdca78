"""The merge's unit of work: a piece, i.e. a block of at most ``BLOCK`` elements of one tensor's rows, and the
loads of the pieces (read, converted to fp32) on threads ahead of the caller.

Blocks of rows, not whole tensors, bound memory by ``BLOCK`` rather than by the largest tensor (an embedding of
a 128K vocabulary is 1 GB in fp32); rows along the first dimension are contiguous in a safetensors file, so a
block is one contiguous range of bytes (``safe_open(...).get_slice(name)[a:b]``).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fedfleet.hpc.merge.checkpoint import Checkpoint
from fedfleet.hpc.merge.errors import MergeError

BLOCK = 1 << 20  # elements of a piece at most (4 MiB in fp32); a single row longer than that is one piece
Rows = tuple[int, int] | None  # rows start:stop of the first dimension; None: the whole tensor
Piece = tuple[str, Rows]
READERS = 2  # pieces loaded ahead of the caller, each on a thread of its own


def pieces(ck: Checkpoint, names: list[str] | None = None) -> list[Piece]:
    """The pieces of ``names`` (default: every tensor of ``ck``), in order."""
    out: list[Piece] = []
    for name in ck.tensors if names is None else names:
        shape = ck.tensors[name].shape
        if not shape or shape[0] <= 1:
            out.append((name, None))
            continue
        row = max(1, ck.tensors[name].numel // shape[0])
        per = max(1, BLOCK // row)
        out += [(name, (a, min(a + per, shape[0]))) for a in range(0, shape[0], per)]
    return out


def is_last(piece: Piece, ck: Checkpoint) -> bool:
    """The piece ends its tensor."""
    name, rows = piece
    return rows is None or rows[1] == ck.tensors[name].shape[0]


class Buffers:
    """fp32 blocks of ``BLOCK`` elements, reused from piece to piece and thread to thread. Fresh memory costs a
    page fault per 4 KiB, measured as dear as the bf16 -> fp32 conversion itself, and blocks allocated on one
    thread and freed on another grow malloc's per-thread arenas (+150 MB of peak RSS, measured)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if n > BLOCK:  # one row longer than a block: a piece of its own size
            return torch.empty(shape, dtype=torch.float32)
        with self._lock:
            block = self._free.pop() if self._free else None
        if block is None:
            block = torch.empty(BLOCK, dtype=torch.float32)
        return block[:n].view(shape)

    def give(self, t: torch.Tensor) -> None:
        """``t`` (from ``take``) is no longer used by anyone: its block may be handed out again."""
        block = t if t._base is None else t._base
        if block.dim() == 1 and block.numel() == BLOCK and block.dtype == torch.float32:
            with self._lock:
                self._free.append(block)


def load(ck: Checkpoint, piece: Piece, buffers: Buffers) -> torch.Tensor:
    """A piece of ``ck`` in fp32, in a block of ``buffers``: the read (its page faults) and the conversion, on
    a read-ahead thread."""
    name, rows = piece
    x = ck.read(name, rows)
    return buffers.take(tuple(x.shape)).copy_(x)


def all_finite(t: torch.Tensor) -> bool:
    """A sum is one pass with no temporary; a finite array can still overflow it, so confirm before refusing."""
    return not t.numel() or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(ckpts: list[Checkpoint], piece: Piece, what: str = "the weighted mean") -> None:
    """After ``what`` of ``piece`` came out non-finite: the first checkpoint whose piece holds a NaN or an inf."""
    name, rows = piece
    for ck in ckpts:
        if not all_finite(ck.read(name, rows).to(torch.float32)):
            raise MergeError(f"{ck.tensors[name].file}: tensor {name!r} holds NaN or infinite values")
    raise MergeError(f"tensor {name!r}: {what} overflows fp32 or is not finite")


def read_ahead(
    ckpts: list[Checkpoint], order: list[Piece], buffers: Buffers, depth: int = READERS
) -> Iterator[tuple[tuple[Piece, int], torch.Tensor]]:
    """Every piece of ``order`` from every checkpoint (piece-major), in fp32, loaded by ``depth`` threads ahead
    of the caller: the reads' page faults and conversions of two pieces run on both cores while the caller
    folds the one before them."""
    jobs = [(piece, i) for piece in order for i in range(len(ckpts))]
    with ThreadPoolExecutor(depth, thread_name_prefix="merge-read") as pool:
        pending: deque[Future[torch.Tensor]] = deque()
        submitted = 0
        try:
            for piece, i in jobs:
                while submitted < len(jobs) and len(pending) < depth:
                    next_piece, next_i = jobs[submitted]
                    pending.append(pool.submit(load, ckpts[next_i], next_piece, buffers))
                    submitted += 1
                tensor = pending.popleft().result()
                yield (piece, i), tensor
                del tensor
        finally:
            for future in pending:  # a failure or an abandoned merge: no read left running
                future.cancel()
