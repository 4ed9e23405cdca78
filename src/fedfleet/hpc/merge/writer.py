"""Writing a Hugging Face checkpoint tensor by tensor, published whole or not at all.

``save_file`` needs every tensor of a shard in memory at once (O(shard), 2-5 GB). Here the header is written
first, from the layout known before the merge starts (names, shapes, output dtypes), and each tensor's bytes
follow as soon as it is merged, so the writer holds no more than the few pieces queued for it. The file is the
safetensors format exactly (8-byte little-endian header length, JSON header padded with spaces to 8 bytes,
the tensors' bytes back to back in header order), and it is hashed as it is written.

Everything goes into a temp folder beside the output; ``Staging.commit`` fsyncs it and renames it to the
output's name, so a reader (or a crash) sees either no output or a whole one. A failure removes the temp
folder, which this module created, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import torch

from fedfleet.hpc.merge.checkpoint import INDEX, SINGLE, TO_SAFETENSORS
from fedfleet.hpc.merge.errors import MergeError

Entry = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype of one tensor to write

CAST_BLOCK = 1 << 20  # elements cast to the output dtype at a time (4 MiB of fp32), on the writer thread
WRITE_QUEUE = 2  # pieces waiting for the writer thread at most
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 (Hugging Face's units)."""
    if isinstance(text, int):
        size = text
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
        if not found or found.group(2).upper() not in _UNITS:
            raise MergeError(f"size {text!r}: give a number with a unit, e.g. 2GB, 500MB or 4GiB")
        size = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if size <= 0:
        raise MergeError(f"size {text!r} must be positive")
    return size


def entry_bytes(entry: Entry) -> int:
    n = 1
    for s in entry[1]:
        n *= s
    return n * entry[2].itemsize


def plan_shards(entries: list[Entry], max_bytes: int) -> list[tuple[str, list[Entry]]]:
    """Tensors in order, a new shard whenever the next one would pass ``max_bytes`` (a bigger tensor gets a
    shard of its own); file names as ``save_pretrained`` gives them."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry_bytes(entry)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    if len(groups) == 1:
        return [(SINGLE, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def index_json(shards: list[tuple[str, list[Entry]]]) -> str:
    total = sum(entry_bytes(e) for _, group in shards for e in group)
    weight_map = {e[0]: file for file, group in shards for e in group}
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"


class ShardWriter:
    """One safetensors file whose layout is fixed at open: ``write`` the tensors in that order, each whole or as
    consecutive pieces (row blocks), then ``close``. Casting happens here, a block at a time; hashing and writing
    happen on a thread of their own (hashlib and file writes release the GIL), a few blocks behind."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":  # safetensors stores little-endian; torch's bytes are native
            raise MergeError("writing safetensors needs a little-endian machine")
        self.path = path
        self._entries = list(entries)
        self._next = 0
        self._left = 0  # elements of the current entry still to come
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in self._entries:
            end = offset + entry_bytes((name, shape, dtype))
            header[name] = {"dtype": TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 -- closed in close() or discard()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="merge-write")
        self._pending: deque[Future[None]] = deque()
        self._put(torch.frombuffer(bytearray(len(text).to_bytes(8, "little") + text), dtype=torch.uint8))

    def write(self, name: str, piece: torch.Tensor, done: Callable[[torch.Tensor], None] | None = None) -> None:
        """The next tensor, or the next piece of it, in any float dtype. The writer thread casts it to the planned
        dtype (a block at a time), hashes and writes it, then calls ``done(piece)``; until then the caller must
        not change ``piece``."""
        if self._left == 0:
            if self._next == len(self._entries):
                raise AssertionError(f"{self.path.name}: {name} is one tensor too many")
            self._left = entry_bytes(self._entries[self._next]) // self._entries[self._next][2].itemsize
            self._next += 1
        want, _, dtype = self._entries[self._next - 1]
        if name != want or piece.numel() > self._left:
            raise AssertionError(f"{self.path.name}: expected (the rest of) {want}, got {name} {tuple(piece.shape)}")
        self._put(piece.detach().reshape(-1), dtype, done and (lambda: done(piece)))
        self._left -= piece.numel()

    def close(self) -> str:
        """Wait for the writes, fsync the file and return its SHA-256."""
        try:
            while self._pending:
                self._pending.popleft().result()
            if self._left or self._next != len(self._entries):
                raise AssertionError(f"{self.path.name}: not every tensor was written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self.discard()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._pool.shutdown(wait=True)
        self._file.close()

    def _put(
        self, data: torch.Tensor, dtype: torch.dtype = torch.uint8, done: Callable[[], None] | None = None
    ) -> None:
        """Queue ``data`` (1-D; kept alive by the closure) to be cast to ``dtype``, hashed and written, in order."""
        while len(self._pending) >= WRITE_QUEUE:
            self._pending.popleft().result()

        def sink() -> None:
            for start in range(0, data.numel(), CAST_BLOCK):
                view = memoryview(data[start : start + CAST_BLOCK].to(dtype).contiguous().view(torch.uint8).numpy())
                self._hash.update(view)
                self._file.write(view)
            if done is not None:
                done()

        self._pending.append(self._pool.submit(sink))


class Staging:
    """A temp folder beside ``out`` that becomes ``out`` at ``commit``; removed if the block fails."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.sums: dict[str, str] = {}  # file name -> sha256 of what was written

    def __enter__(self) -> Staging:
        if self.out.exists() or self.out.is_symlink():
            raise MergeError(f"{self.out} already exists: choose a new output folder (merge never replaces one)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        return self

    def write_text(self, name: str, text: str) -> None:
        data = text.encode()
        with open(self.tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.sums[name] = hashlib.sha256(data).hexdigest()

    def commit(self) -> None:
        _fsync_dir(self.tmp)
        if self.out.exists():
            raise MergeError(f"{self.out} appeared while merging: the merge is left unpublished")
        os.rename(self.tmp, self.out)
        _fsync_dir(self.out.parent)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["INDEX", "ShardWriter", "Staging", "index_json", "parse_size", "plan_shards"]
