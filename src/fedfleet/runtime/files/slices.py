"""A rank's own slices of published params, read without reading (or holding) the rest of the model.

The party's side of issue 17's sharded exchange, reading: an FSDP rank needs only its box of every exchanged
tensor of the next global model. A manifest published with ``block_bytes`` lists the SHA-256 of every block of
each file, so a rank reads the blocks that hold the header and its rows, checks each block's sum before using a
byte of it, and copies its rows out: the bytes read are its shard plus at most a block at either end of each
tensor, and the memory held is its shard plus a few blocks. A manifest without block sums is refused: the whole
file would have to be read to check it, which is what the sharded exchange is for avoiding.

Boxes are read by rows: the rows of dim 0 the box covers are one contiguous run of the file, the box's extent in
the other dims is taken from them (FSDP2 shards dim 0, so a box is its rows exactly).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fedfleet.core.params import ParamSpec
from fedfleet.core.safetensors_stream import header_length, parse_header
from fedfleet.runtime.files.exchange import Refused, checked_manifest, listed_size, open_published

Region = tuple[slice, ...]
CACHED_BLOCKS = 4  # the header's and a tensor boundary's blocks are usually read twice


@dataclass(frozen=True)
class Slices:
    """The verified manifest, its bytes' SHA-256, each asked-for box's values, and the bytes read for them."""

    manifest: dict[str, Any]
    sha256: str
    tensors: dict[str, torch.Tensor]
    bytes_read: int


def read_slices(path: Path, expect: dict[str, Any], spec: ParamSpec, boxes: Mapping[str, Region]) -> Slices | None:
    """The values of ``boxes`` (param name -> its slices) of the params the manifest at ``path`` publishes, or None
    while there is no manifest. Raises Refused naming the file when anything does not check."""
    found = checked_manifest(path, expect, spec)
    if found is None:
        return None
    body, digest = found
    if "boxes" in body:
        raise Refused(f"{path}: published as boxes; a rank reads its slices from whole tensors only")
    readers = {file: _BlockReader(path.parent / file, body["files"][file]) for file in body["params"]}
    try:
        located = _locate(path, readers, spec)
        out = {}
        for name, region in boxes.items():
            reader, begin = located[name]
            out[name] = _read_box(reader, begin, spec[name].shape, spec[name].dtype, region)
            if not bool(torch.isfinite(out[name]).all()):
                raise Refused(f"{reader.path}: holds NaN or infinite values ({name})")
    finally:
        for reader in readers.values():
            reader.close()
    return Slices(body, digest, out, sum(r.bytes_read for r in readers.values()))


def _locate(path: Path, readers: dict[str, _BlockReader], spec: ParamSpec) -> dict[str, tuple[_BlockReader, int]]:
    """Where each param's bytes start (in its file, from the checked headers); every param exactly once, with the
    layout's dtype and shape."""
    located: dict[str, tuple[_BlockReader, int]] = {}
    for reader in readers.values():
        prefix = reader.read(0, 8)
        try:
            length = header_length(prefix, reader.size)
            tensors = parse_header(reader.read(8, 8 + length), reader.size - 8 - length)
        except ValueError as exc:
            raise Refused(f"{reader.path}: not a safetensors file ({exc})") from None
        for name, dtype, shape, begin, _ in tensors:
            if name not in spec or name in located:
                raise Refused(f"{reader.path}: holds {name}, which the layout has not or another file holds too")
            if (dtype, tuple(shape)) != (spec[name].dtype, spec[name].shape):
                raise Refused(f"{reader.path}: {name} is {list(shape)} {dtype}, the layout says otherwise")
            located[name] = (reader, 8 + length + begin)
    if missing := [n for n in spec.names if n not in located]:
        raise Refused(f"{path}: {missing[0]} is in none of its params files")
    return located


def _read_box(reader: _BlockReader, begin: int, shape: tuple[int, ...], dtype: torch.dtype, region: Region):
    """The box ``region`` of the tensor whose bytes start at ``begin``: its rows read, the rest sliced off."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not shape:  # a scalar: the whole of it
        return torch.frombuffer(reader.read(begin, begin + itemsize), dtype=dtype).reshape(())
    rows = region[0] if region else slice(0, shape[0])
    row_bytes = math.prod(shape[1:]) * itemsize
    if rows.stop <= rows.start:
        return torch.empty((0, *shape[1:]), dtype=dtype)[(slice(None), *region[1:])]
    data = reader.read(begin + rows.start * row_bytes, begin + rows.stop * row_bytes)
    block = torch.frombuffer(data, dtype=dtype).reshape(rows.stop - rows.start, *shape[1:])
    rest = region[1:]
    whole_rows = all(s.start in (0, None) and s.stop in (n, None) for s, n in zip(rest, shape[1:], strict=False))
    return block if whole_rows else block[(slice(None), *rest)].clone()  # the buffer is this tensor's own


class _BlockReader:
    """Byte ranges of one listed file, every block they touch checked against the manifest's block sums."""

    def __init__(self, path: Path, entry: Any) -> None:
        self.path = path
        self.size = listed_size(path, entry)
        blocks = entry.get("blocks")
        sums = blocks.get("sha256") if isinstance(blocks, dict) else None
        self.block = blocks.get("bytes") if isinstance(blocks, dict) else None
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise Refused(f"{path}: its manifest entry has no block sums; a rank cannot read only its shard of it")
        if not isinstance(sums, list) or len(sums) != math.ceil(self.size / self.block):
            raise Refused(f"{path}: the manifest lists {_count(sums)} block sums for {self.size} bytes")
        self.sums = sums
        self.bytes_read = 0
        self._file: BinaryIO | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def read(self, start: int, stop: int) -> bytearray:
        """Bytes ``start`` to ``stop``, copied block by block into one buffer as each block checks."""
        if not 0 <= start <= stop <= self.size:
            raise Refused(f"{self.path}: bytes {start}-{stop} are outside its {self.size}")
        out = bytearray(stop - start)
        at = start
        while at < stop:
            k = at // self.block
            data = self._checked(k)
            end = min(stop, (k + 1) * self.block)
            out[at - start : end - start] = data[at - k * self.block : end - k * self.block]
            at = end
        return out

    def _checked(self, k: int) -> bytes:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        if self._file is None:
            self._file = open_published(self.path)
        self._file.seek(k * self.block)
        want = min(self.block, self.size - k * self.block)
        data = self._file.read(want)
        self.bytes_read += len(data)
        if len(data) != want or hashlib.sha256(data).hexdigest() != self.sums[k]:
            raise Refused(f"{self.path}: block {k} does not match the manifest's sum (damaged or replaced)")
        self._cache[k] = data
        if len(self._cache) > CACHED_BLOCKS:
            self._cache.popitem(last=False)
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _count(value: Any) -> int | str:
    return len(value) if isinstance(value, list) else "no"
