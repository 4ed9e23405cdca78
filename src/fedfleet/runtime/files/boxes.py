"""Updates published as boxes: pieces of tensors keyed by name and offset, from any number of files.

The first half of issue 17's sharded exchange, on the arbiter's side: a party whose ranks each hold a box of every
tensor (FSDP) can publish one file per rank, each tensor of a file being a box of a named param at an offset, and
the manifest's ``boxes`` saying which. The arbiter assembles the full update and checks that the boxes cover every
value of every param exactly once: a gap, an overlap, a box outside its tensor, a dtype that is not the layout's
or a param the model has not is refused naming the file. Keyed by name and offset, never by rank, so parties of
different world sizes fold together. An FSDP party's ranks each write their own file (``write_box_file``) and
its rank 0 the manifest (``publish_box_manifest``): ``runtime/files/sharded_party.py``.

Manifest::

    "params": ["rank-00000.safetensors", "rank-00001.safetensors"],
    "boxes": {"rank-00000.safetensors": {"w@0": {"param": "w", "offsets": [0, 0]}, ...}, ...}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.safetensors_stream import tensors_in, write_file
from fedfleet.core.serialize import fsync_replace

Box = tuple[str, Sequence[int], torch.Tensor]  # (param, offsets, values)


def publish_boxes(folder: Path, files: Mapping[str, Sequence[Box]], spec: ParamSpec, manifest: dict[str, Any]) -> dict:
    """Write each file's boxes (a tensor each, keyed ``param@offsets``), then the manifest listing them."""
    written = [write_box_file(folder, file, pieces) for file, pieces in files.items()]
    return publish_box_manifest(folder, written, spec, manifest)


def write_box_file(folder: Path, file: str, pieces: Sequence[Box]) -> dict[str, Any]:
    """One file of boxes (an FSDP rank writes its own); returns what the manifest lists of it."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, entries = {}, {}
    for param, offsets, values in pieces:
        key = f"{param}@{','.join(str(o) for o in offsets)}"
        tensors[key] = values.detach().contiguous().cpu()
        entries[key] = {"param": param, "offsets": [int(o) for o in offsets]}
    tmp = folder / f".{file}.{os.getpid()}.tmp"
    digest, size = write_file(tmp, tensors)
    fsync_replace(tmp, folder / file)
    return {"file": file, "sha256": digest, "bytes": size, "boxes": entries}


def publish_box_manifest(folder: Path, written: Sequence[dict[str, Any]], spec: ParamSpec, manifest: dict) -> dict:
    """The manifest of box files already written (``write_box_file``'s results, from any process), last."""
    from fedfleet.runtime.files.exchange import FORMAT, layout, write_manifest

    listed = {w["file"]: {"sha256": w["sha256"], "bytes": w["bytes"]} for w in written}
    body = {"format": FORMAT, **manifest, "layout": layout(spec), "params": [w["file"] for w in written],
            "files": listed, "boxes": {w["file"]: w["boxes"] for w in written}}  # fmt: skip
    write_manifest(folder, body)
    return body


def assemble(path: Path, blobs: Mapping[str, bytearray], boxes: Any, spec: ParamSpec | None) -> FlatParams:
    """The full params from the boxes of ``blobs`` (each file's checked bytes), per the manifest's ``boxes``."""
    from fedfleet.runtime.files.exchange import Refused

    if spec is None:
        raise Refused(f"{path}: an update in boxes needs the global model's layout to be assembled into")
    if not isinstance(boxes, dict) or set(boxes) != set(blobs):
        raise Refused(f"{path}: its boxes do not list exactly its params files")
    flat = FlatParams.zeros(spec)
    views = flat.tensors()
    cover = {name: torch.zeros(spec[name].shape, dtype=torch.uint8) for name in spec.names}
    for file, blob in blobs.items():
        where = path.parent / file
        try:
            tensors = tensors_in(blob)
        except ValueError as exc:
            raise Refused(f"{where}: not a safetensors file ({exc})") from None
        entries = boxes[file]
        if not isinstance(entries, dict) or set(entries) != set(tensors):
            raise Refused(f"{where}: its tensors are not the boxes the manifest lists for it")
        for key, values in tensors.items():
            param, region = _region(where, key, entries[key], values, spec)
            views[param][region].copy_(values)
            cover[param][region] += 1
            if int(cover[param][region].max()) > 1:
                raise Refused(f"{where}: box {key} overlaps another box of {param}")
    for name, counted in cover.items():
        missing = int((counted == 0).sum())
        if missing:
            raise Refused(f"{path}: {missing} values of {name} are in no box")
    return flat


def _region(where: Path, key: str, entry: Any, values: torch.Tensor, spec: ParamSpec) -> tuple[str, tuple]:
    from fedfleet.runtime.files.exchange import Refused

    param = entry.get("param") if isinstance(entry, dict) else None
    offsets = entry.get("offsets") if isinstance(entry, dict) else None
    if not isinstance(param, str) or param not in spec:
        raise Refused(f"{where}: box {key} is of {param!r}, which the global model has not")
    want = spec[param]
    if values.dtype != want.dtype:
        raise Refused(f"{where}: box {key} is {values.dtype}, {param} is {want.dtype}")
    ok = isinstance(offsets, list) and len(offsets) == len(want.shape) and values.dim() == len(want.shape)
    ok = ok and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    if not ok or any(o + n > size for o, n, size in zip(offsets, values.shape, want.shape, strict=True)):
        raise Refused(f"{where}: box {key} of shape {list(values.shape)} at {offsets} is not inside {param} "
                      f"{list(want.shape)}")  # fmt: skip
    return param, tuple(slice(o, o + n) for o, n in zip(offsets, values.shape, strict=True))
