"""One rank's part of the params on the wire: the boxes a rank of a sharded (FSDP) party holds, as a layout of its own.

A rank of a sharded party holds, of each exchanged tensor, the rows ``[start, start + rows)`` (FSDP2 shards along
dim 0). Its stream to the arbiter carries only those rows, as if they were a model of their own: the **compact
layout** lists one entry per box (``name[start:stop]``), so the rank's side is an ordinary ``SyncParty`` over a
shard-sized inbox, and only the arbiter knows where each compact element sits in the session's params. Every box
of rows is one contiguous span of its tensor's flat buffer, so the map is a short list of spans per dtype.

On the arbiter, ``iter_layout_chunks`` cuts a rank's compact chunks out of the global params (one copy per chunk,
as for a whole model) and ``LayoutReceiver`` writes a rank's incoming chunks to their places in a party's receive
buffer, with the same order, bounds and size checks as ``ParamsReceiver``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.runtime.grpc.chunks import MIN_CHUNK_BYTES, ParamsReceiver, safetensors_blob
from fedfleet.runtime.grpc.wire import Chunk

Box = tuple[str, int, int]  # a tensor's name, its first row, how many rows
MAX_BOXES = 1 << 16  # boxes one rank may declare: a few per tensor of the largest models


@dataclass(frozen=True)
class Span:
    """``count`` elements at ``start`` of the global dtype buffer, at ``compact`` of the rank's buffer."""

    start: int
    compact: int
    count: int


class RankLayout:
    """The compact layout of ``boxes`` of ``spec`` (the session's whole layout), and where each part lives in it."""

    def __init__(self, spec: ParamSpec, boxes: Sequence[Box]) -> None:
        if len(boxes) > MAX_BOXES:
            raise ValueError(f"{len(boxes)} boxes, more than the {MAX_BOXES} a rank may declare")
        rows, seen = [], set()
        self.spans: dict[torch.dtype, list[Span]] = {}
        compact_at: dict[torch.dtype, int] = {}
        for box in boxes:
            name, start, count = _box(box)
            if name not in spec:
                raise ValueError(f"a box of {name[:200]!r}, which is not one of the session's tensors")
            if name in seen:
                raise ValueError(f"two boxes of {name}")
            seen.add(name)
            entry = spec[name]
            height = entry.shape[0] if entry.shape else 1
            if not 0 <= start < start + count <= height:
                raise ValueError(f"{name}: rows [{start}, {start + count}) outside its {height} rows")
            per_row = entry.numel // height if height else 0
            shape = (count, *entry.shape[1:]) if entry.shape else ()
            rows.append((f"{name}[{start}:{start + count}]", shape, entry.dtype))
            at = compact_at.get(entry.dtype, 0)
            self.spans.setdefault(entry.dtype, []).append(Span(entry.offset + start * per_row, at, count * per_row))
            compact_at[entry.dtype] = at + count * per_row
        self.compact = ParamSpec(rows)
        self.boxes = tuple(_box(b) for b in boxes)

    def covered(self) -> dict[torch.dtype, list[tuple[int, int]]]:
        """The global ``(start, stop)`` ranges this layout covers, per dtype, in order."""
        return {d: sorted((s.start, s.start + s.count) for s in spans) for d, spans in self.spans.items()}


def tiles(spec: ParamSpec, layouts: Sequence[RankLayout]) -> str:
    """'' when ``layouts`` cover every element of ``spec`` exactly once; otherwise what is missing or twice."""
    for dtype, size in spec.sizes.items():
        ranges = sorted(r for layout in layouts for r in layout.covered().get(dtype, []))
        at = 0
        for start, stop in ranges:
            if start < at:
                return f"{dtype} elements [{start}, {min(stop, at)}) are written by two ranks"
            if start > at:
                return f"{dtype} elements [{at}, {start}) are written by no rank"
            at = stop
        if at != size:
            return f"{dtype} elements [{at}, {size}) are written by no rank"
    return ""


def iter_layout_chunks(params: FlatParams, layout: RankLayout, chunk_bytes: int) -> Iterator[Chunk]:
    """The chunks of ``layout``'s part of ``params`` (the global params), in compact offsets, made lazily."""
    for dtype, spans in layout.spans.items():
        buf = params.buffers[dtype].detach()
        per_chunk = max(1, chunk_bytes // buf.element_size())
        total = layout.compact.sizes[dtype]
        for at in range(0, total, per_chunk):
            stop = min(at + per_chunk, total)
            parts = [buf[s.start + a - s.compact : s.start + b - s.compact] for s, a, b in _overlaps(spans, at, stop)]
            piece = parts[0] if len(parts) == 1 else torch.cat(parts)
            data = piece.cpu().view(torch.uint8).numpy()
            yield Chunk(payload=safetensors_blob(dtype, at, stop - at, data))


class LayoutReceiver(ParamsReceiver):
    """Writes one rank's compact chunks into their places in ``target`` (a party's receive buffer, global layout)."""

    def __init__(self, target: FlatParams, layout: RankLayout, min_chunk_bytes: int = MIN_CHUNK_BYTES) -> None:
        self.layout = layout
        super().__init__(target, min_chunk_bytes, sizes=layout.compact.sizes)

    def _write(self, dtype: torch.dtype, offset: int, count: int, data: memoryview) -> None:
        item = self.target.buffers[dtype].element_size()
        incoming = np.frombuffer(data, dtype=np.uint8)
        for span, lo, hi in _overlaps(self.layout.spans[dtype], offset, offset + count):
            self._place(dtype, span.start + lo - span.compact, incoming[(lo - offset) * item : (hi - offset) * item])


def to_wire(spec: ParamSpec, boxes: Sequence[Box], sent: set[str]) -> list[list[int]]:
    """A join's ``boxes``: ``[tensor index, first row, rows, sends]`` each (``wire.Join``)."""
    index = {name: i for i, name in enumerate(spec.names)}
    return [[index[name], start, rows, int(name in sent)] for name, start, rows in boxes]


def wire_boxes(spec: ParamSpec, rows: object) -> tuple[list[Box], list[Box]]:
    """A join's ``boxes`` read back: the boxes held, and those sent. ``ValueError`` says what is wrong."""
    if not isinstance(rows, list) or len(rows) > MAX_BOXES:
        raise ValueError(f"boxes must be a list of at most {MAX_BOXES} [tensor, first row, rows, sends]")
    held, sent = [], []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and all(type(v) is int for v in row)):
            raise ValueError(f"a box must be [tensor index, first row, rows, sends], got {str(row)[:200]}")
        i, start, count, sends = row
        if not 0 <= i < len(spec.entries) or sends not in (0, 1):
            raise ValueError(f"a box of tensor {i} (the layout has {len(spec.entries)}), sends {sends}")
        box = (spec.entries[i].name, start, count)
        held.append(box)
        if sends:
            sent.append(box)
    return held, sent


def _overlaps(spans: list[Span], lo: int, hi: int) -> Iterator[tuple[Span, int, int]]:
    """Each span meeting compact range ``[lo, hi)``, with the part of the range inside it."""
    for span in spans:  # in compact order; a rank has a few spans per tensor
        a, b = max(lo, span.compact), min(hi, span.compact + span.count)
        if a < b:
            yield span, a, b


def _box(box: object) -> Box:
    try:
        name, start, count = box  # type: ignore[misc]
        if not isinstance(name, str) or type(start) is not int or type(count) is not int:
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"a box must be [name, first row, rows], got {str(box)[:200]}") from None
    if count <= 0:
        raise ValueError(f"{name[:200]}: a box of {count} rows")
    return name, start, count
