"""Params on the wire: each dtype's flat buffer sliced into chunks of a few MiB, each a safetensors blob.

Why chunks: a gRPC message has a size limit (and a single tensor may exceed 2 GiB), and neither side
should hold a second copy of the model to send or receive it. The sender slices its flat buffers in
place (one copy per chunk, into the frame); the receiver writes each chunk straight into its own
preallocated flat buffer. Chunks of one buffer arrive in order, so coverage is checked with a cursor:
no gap, no overlap, no byte twice.

Each chunk is a valid safetensors file holding one 1-D tensor (``data``, in the buffer's own dtype) and
metadata naming the buffer and the element offset, so a chunk can be inspected with any safetensors tool.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import numpy as np
import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.runtime.grpc.wire import Chunk, WireError

DEFAULT_CHUNK_BYTES = 4 << 20
# every chunk but a buffer's last carries at least this much (the smallest chunk_mib): a sender cannot make the
# receiver run its per-chunk work once per element
MIN_CHUNK_BYTES = 64 << 10

# safetensors dtype codes (the format's own names)
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_U64 = struct.Struct("<Q")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def iter_chunks(params: FlatParams, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """The chunks of ``params``, made lazily (gRPC pulls them as the network takes them)."""
    for dtype, buf in params.buffers.items():
        item = buf.element_size()
        per_chunk = max(1, chunk_bytes // item)
        raw = buf.detach()
        for start in range(0, raw.numel(), per_chunk):
            piece = raw[start : start + per_chunk]
            data = piece.cpu().view(torch.uint8).numpy()  # a view on CPU: the frame's join is the one copy
            yield Chunk(payload=safetensors_blob(dtype, start, piece.numel(), data))


def safetensors_blob(dtype: torch.dtype, offset: int, count: int, data: np.ndarray) -> tuple:
    header = {
        "__metadata__": {"buffer": dtype_name(dtype), "offset": str(offset)},
        "data": {"dtype": DTYPE_CODES[dtype], "shape": [count], "data_offsets": [0, data.nbytes]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so tensor data stays 8-byte aligned
    return (_U64.pack(len(raw)), raw, data.data)  # joined once, into the frame


class ParamsReceiver:
    """Writes incoming chunks into ``target`` and says when every byte of every buffer has arrived.

    ``sizes``: the elements each dtype's chunks number (the target's buffers by default); a subclass that maps
    them elsewhere (``rank_layout.LayoutReceiver``) says where each chunk goes in ``_write``."""

    def __init__(
        self, target: FlatParams, min_chunk_bytes: int = MIN_CHUNK_BYTES, sizes: dict[torch.dtype, int] | None = None
    ) -> None:
        self.target = target
        self.min_chunk_bytes = min_chunk_bytes
        self._numel = dict(sizes) if sizes is not None else {d: b.numel() for d, b in target.buffers.items()}
        self._by_name = {dtype_name(d): d for d in self._numel}
        self._cursor = dict.fromkeys(self._numel, 0)
        self._bytes = {d: b.view(torch.uint8) if b.device.type == "cpu" else None for d, b in target.buffers.items()}

    @property
    def complete(self) -> bool:
        return all(self._cursor[d] == n for d, n in self._numel.items())

    def add(self, chunk: Chunk) -> None:
        """Copy one chunk into place; ``WireError`` names what is wrong with a malformed or misplaced one."""
        dtype, offset, count, data = _parse_blob(chunk.payload)
        if dtype not in self._by_name:
            raise WireError(f"chunk for a {dtype} buffer, but the params have {sorted(self._by_name)}")
        dt = self._by_name[dtype]
        numel = self._numel[dt]
        if offset != self._cursor[dt]:
            raise WireError(f"{dtype} chunk at element {offset}, expected {self._cursor[dt]} (gap or overlap)")
        if offset + count > numel:
            raise WireError(f"{dtype} chunk ends at element {offset + count}, past the buffer's {numel}")
        if len(data) != count * self.target.buffers[dt].element_size():
            raise WireError(f"{dtype} chunk holds {len(data)} bytes for {count} elements")
        if offset + count < numel and len(data) < self.min_chunk_bytes:
            raise WireError(f"{dtype} chunk of {len(data)} bytes before the buffer's end (min {self.min_chunk_bytes})")
        self._write(dt, offset, count, data)
        self._cursor[dt] = offset + count

    def _write(self, dtype: torch.dtype, offset: int, count: int, data: memoryview) -> None:
        """Put ``count`` elements (``data``) at element ``offset`` of the target's ``dtype`` buffer."""
        self._place(dtype, offset, np.frombuffer(data, dtype=np.uint8))

    def _place(self, dtype: torch.dtype, offset: int, incoming: np.ndarray) -> None:
        buf = self.target.buffers[dtype]
        item = buf.element_size()
        flat_bytes = self._bytes[dtype]
        if flat_bytes is not None:
            flat_bytes.numpy()[offset * item : offset * item + len(incoming)] = incoming
        else:  # a GPU target: stage through a small host tensor
            buf.view(torch.uint8)[offset * item : offset * item + len(incoming)].copy_(torch.tensor(incoming))


def _parse_blob(blob: bytes | memoryview) -> tuple[str, int, int, memoryview]:
    view = memoryview(blob)
    try:
        (n,) = _U64.unpack_from(view)
        header = json.loads(bytes(view[_U64.size : _U64.size + n]))
        meta = header["__metadata__"]
        entry = header["data"]
        start, end = entry["data_offsets"]
        dtype, offset, (count,) = meta["buffer"], int(meta["offset"]), entry["shape"]
        if CODE_DTYPES.get(entry["dtype"]) is None or dtype_name(CODE_DTYPES[entry["dtype"]]) != dtype:
            raise ValueError(f"dtype {entry['dtype']} does not match buffer {dtype}")
        body = view[_U64.size + n :]
        if not 0 <= start <= end <= len(body):
            raise ValueError("data offsets outside the chunk")
        return dtype, offset, int(count), body[start:end]
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise WireError(f"malformed chunk: {exc}") from None


def describe_spec(spec: ParamSpec) -> list[list]:
    """The layout as JSON-able ``[name, shape, dtype]`` rows (a party tells a model-less arbiter its layout)."""
    return [[e.name, list(e.shape), dtype_name(e.dtype)] for e in spec.entries]


def layout_json(spec: ParamSpec) -> bytes:
    """``describe_spec`` as a join's payload: compact JSON."""
    return json.dumps(describe_spec(spec), separators=(",", ":")).encode()


def spec_from_description(rows: list) -> ParamSpec:
    by_name = {dtype_name(d): d for d in DTYPE_CODES}
    try:
        return ParamSpec([(str(name), tuple(int(s) for s in shape), by_name[dtype]) for name, shape, dtype in rows])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"unreadable param layout: {exc!r}") from None
