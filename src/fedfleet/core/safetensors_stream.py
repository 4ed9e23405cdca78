"""safetensors files written and read without extra copies of the tensors: for exchanges of whole large models.

``safetensors.torch.save_file`` wants tensors that share no storage (so a flat buffer's views must be cloned
first) and serialises the whole file in memory; reading a file that was just checked byte for byte with
``safetensors.torch.load(bytes)`` copies every tensor out of those bytes again. For a 2.2 GB model that is
several GB of transient memory and most of the time. Here:

- :func:`write_file` writes the header, then each tensor's bytes straight from its (contiguous) view, hashing
  them as they go: the SHA-256 and size come back with no second read of the file;
- :func:`tensors_in` parses a file's bytes (already size- and hash-checked by the caller) and returns tensors
  that are views into them, after checking the header as safetensors does: known dtypes, whole-number shapes,
  offsets that tile the data region exactly, byte counts that match the shapes. Nothing is executed, nothing is
  unpickled: the header is JSON.

The files are the safetensors format exactly (8-byte little-endian header length, JSON header padded with
spaces to 8 bytes, the tensors back to back), so ``safetensors`` reads them and these functions read its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit: a header that claims more is not a file to parse
_BLOCK = 64 << 20  # bytes handed to the hash and the file at a time


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write ``tensors`` (CPU; views of one buffer are fine) to ``path`` and fsync it; returns (sha256, size)."""
    digest, size, _ = write_file_blocks(path, tensors, metadata)
    return digest, size


def write_file_blocks(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, block_bytes: int | None = None
) -> tuple[str, int, list[str]]:
    """:func:`write_file`, also returning the SHA-256 of every ``block_bytes`` of the file (the last one shorter;
    none when ``block_bytes`` is None): a reader that needs only part of the file checks only the blocks it reads."""
    if sys.byteorder != "little":  # safetensors stores little-endian; torch's bytes are native
        raise RuntimeError("writing safetensors needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    blocks = BlockHashes(block_bytes) if block_bytes else None
    size = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in _chunks(len(text).to_bytes(8, "little") + text, tensors):
            digest.update(chunk)
            if blocks is not None:
                blocks.update(chunk)
            size += f.write(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest(), size, [] if blocks is None else blocks.finish()


class BlockHashes:
    """The SHA-256 of each consecutive ``block_bytes`` of a byte stream fed in pieces of any size."""

    def __init__(self, block_bytes: int) -> None:
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self.block_bytes = block_bytes
        self._current = hashlib.sha256()
        self._filled = 0
        self.digests: list[str] = []

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block_bytes - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self.digests.append(self._current.hexdigest())
                self._current, self._filled = hashlib.sha256(), 0

    def finish(self) -> list[str]:
        if self._filled:
            self.digests.append(self._current.hexdigest())
            self._current, self._filled = hashlib.sha256(), 0
        return self.digests


def _chunks(head: bytes, tensors: dict[str, torch.Tensor]):
    yield head
    for t in tensors.values():
        if t.numel() == 0:
            continue
        raw = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        for start in range(0, len(raw), _BLOCK):
            yield raw[start : start + _BLOCK]


def tensors_in(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, as views into ``data`` (keep it alive while they are used).
    Raises ValueError saying what is wrong with the header."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = header_length(data[:8], len(data))
    start = 8 + size
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in parse_header(bytes(data[8:start]), len(data) - start):
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin).view(shape)
    return out


def header_length(prefix: bytes | bytearray, file_size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size."""
    size = int.from_bytes(prefix[:8], "little")
    if size > MAX_HEADER or 8 + size > file_size:
        raise ValueError(f"header length {size} does not fit the file's {file_size} bytes")
    return size


def parse_header(text: bytes, data_length: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, begin, end) of every tensor, in the order of their bytes, once the header is checked
    as safetensors checks it: offsets that tile the ``data_length`` bytes after the header exactly, byte counts
    that match the shapes, known dtypes."""
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    entries = sorted(
        ((_offsets(name, entry), name, entry) for name, entry in header.items() if name != "__metadata__"),
        key=lambda e: e[0],
    )
    out = []
    at = 0
    for (begin, end), name, entry in entries:
        if begin != at:
            raise ValueError(f"{name}: its bytes start at {begin}, not where the previous tensor's end ({at})")
        dtype, shape = _dtype_and_shape(name, entry)
        count = 1
        for s in shape:
            count *= s
        if (end - begin) != count * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"{name}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        out.append((name, dtype, shape, begin, end))
        at = end
    if at != data_length:
        raise ValueError(f"the tensors cover {at} of the data's {data_length} bytes")
    return out


def _offsets(name: str, entry: object) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ValueError(f"{name}: bad data_offsets {offsets!r}")
    return offsets[0], offsets[1]


def _dtype_and_shape(name: str, entry: dict) -> tuple[torch.dtype, list[int]]:
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise ValueError(f"{name}: dtype {entry.get('dtype')!r} is not one fedfleet reads")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{name}: bad shape {shape!r}")
    return dtype, shape
