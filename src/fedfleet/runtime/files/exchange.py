"""The exchange folder: where a round's global model and each party's update are published, and how they are read.

Layout (round numbers are 1-based, as the logs show them)::

    exchange/round-0003/global/params.safetensors     the arbiter's global params of round 3 (or shards:
                                                      params-00001-of-00004.safetensors, ...)
    exchange/round-0003/global/manifest.json          written last: its presence means the files are complete
    exchange/round-0003/updates/<party>/params.safetensors
    exchange/round-0003/updates/<party>/manifest.json

Every file is written to a temp name beside its target, fsynced, renamed and the folder fsynced; the manifest,
which lists the SHA-256 and size of every file, is published last. A reader looks only for manifests: a file
without one is never opened, and a file is parsed (with safetensors, never pickle) only from bytes whose size and
SHA-256 match the manifest, so a file changed after it was checked cannot slip in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.safetensors_stream import header_length, parse_header, tensors_in, write_file_blocks
from fedfleet.core.serialize import fsync_replace

FORMAT = "fedfleet-exchange-1"
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
# a manifest lists files, metrics, block sums (up to MAX_BLOCKS: ~4.5 MB) and an FSDP party's boxes (a 7B model's
# 291 tensors from 64 ranks: ~1.5 MB); anything bigger is not one of ours, and is refused before it is parsed
MAX_MANIFEST_BYTES = 16 << 20
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")  # file and party names: no paths, no hidden files
_NAME = PLAIN_NAME
_ROUND = re.compile(r"^round-(\d{4,})$")


FIRST_POLL_S = 0.02  # a folder is looked at again after this, then 1.5 times later each time, up to poll_s


def poll_delays(cap: float) -> Iterator[float]:
    """The waits between looks at the folder: quick at first, so a round of a small model is not paced by the
    poll interval (a fixed 1 s made every round take 1 s: benchmarks/sites_round_overhead.py), then backing off
    to ``cap``, so a long wait (a batch queue) does not hammer a shared file system's metadata server."""
    delay = min(FIRST_POLL_S, cap)
    while True:
        yield delay
        delay = min(delay * 1.5, cap)


class Refused(Exception):
    """A manifest or one of its files does not verify; the message names the file and why."""


@dataclass(frozen=True)
class Published:
    """A verified manifest and the params its files hold."""

    manifest: dict[str, Any]
    params: FlatParams
    path: Path  # the manifest
    sha256: str  # of the manifest's bytes: an update names the global (params and tasks) it trained from


class Exchange:
    """The paths of one exchange folder (created on first publish)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def round_dir(self, rnd: int) -> Path:
        return self.root / f"round-{rnd:04d}"

    def global_dir(self, rnd: int) -> Path:
        return self.round_dir(rnd) / "global"

    def final_dir(self) -> Path:
        """The session's final global params, published once its last round is committed."""
        return self.root / "final"

    def update_dir(self, rnd: int, party: str) -> Path:
        if not _NAME.match(party):
            raise ValueError(f"party name {party!r} cannot name a folder (letters, digits, '.', '_', '-')")
        return self.round_dir(rnd) / "updates" / party

    def rounds(self) -> list[int]:
        """The round numbers that have a folder, in order."""
        if not self.root.is_dir():
            return []
        found = [int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _ROUND.match(p.name))]
        return sorted(found)


def layout(spec: ParamSpec) -> list[list[Any]]:
    """The params' names, shapes and dtypes, as a manifest lists them."""
    return [[e.name, list(e.shape), str(e.dtype).removeprefix("torch.")] for e in spec.entries]


def publish(
    folder: Path,
    params: FlatParams,
    manifest: dict[str, Any],
    shard_bytes: int | None = None,
    block_bytes: int | None = None,
) -> dict[str, Any]:
    """Write ``params`` (one file, or shards of at most ``shard_bytes`` each, a bigger tensor alone in its own) and
    then the manifest (with the files' sums and sizes added) into ``folder``; returns the manifest written. Each
    file: temp name, fsync, rename, fsync of the folder. ``block_bytes``: each file's entry also lists the SHA-256
    of every block of that many bytes, so a rank reading only its shard checks only what it reads (slices.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = shard_groups(params, shard_bytes)
    names = [PARAMS] if len(groups) == 1 else [f"params-{i:05d}-of-{len(groups):05d}.safetensors"
                                                  for i in range(1, len(groups) + 1)]  # fmt: skip
    files = {}
    block = _block_size(groups, block_bytes)
    for name, group in zip(names, groups, strict=True):
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        digest, size, blocks = write_file_blocks(tmp, group, block_bytes=block)  # hashed as written
        fsync_replace(tmp, folder / name)
        files[name] = {"sha256": digest, "bytes": size}
        if block:
            files[name]["blocks"] = {"bytes": block, "sha256": blocks}
    body = {"format": FORMAT, **manifest, "layout": layout(params.spec), "params": names, "files": files}
    write_manifest(folder, body)
    return body


MAX_BLOCKS = 65536  # per manifest, all its files: 64 GB in 1 MiB blocks, ~4.5 MB of sums


def _block_size(groups: list[dict[str, torch.Tensor]], block_bytes: int | None) -> int | None:
    """``block_bytes``, or larger (a multiple of it) when the files would need more than MAX_BLOCKS in all."""
    if not block_bytes:
        return None
    headers = (1 << 20) * len(groups)  # a file's header is far smaller; bounding it keeps the count a bound
    total = headers + sum(t.numel() * t.element_size() for g in groups for t in g.values())
    return block_bytes * max(1, math.ceil(total / (block_bytes * MAX_BLOCKS)))


def shard_groups(params: FlatParams, shard_bytes: int | None) -> list[dict[str, Any]]:
    """The params' tensors in order, cut into groups of at most ``shard_bytes`` (None: one group)."""
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in params.tensors().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes is not None and groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def write_manifest(folder: Path, body: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    fsync_replace(tmp, folder / MANIFEST)


def file_sum(path: Path, block: int = 4 << 20) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when there is none yet. Raises Refused when it is not a manifest."""
    found = _read_manifest(path)
    return None if found is None else found[0]


def _read_manifest(path: Path) -> tuple[dict[str, Any], str] | None:
    """The manifest and the SHA-256 of the bytes it was parsed from."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_MANIFEST_BYTES:
        raise Refused(f"{path}: {size} bytes, more than a manifest's {MAX_MANIFEST_BYTES}")
    try:
        data = path.read_bytes()
        body = json.loads(data)
    except FileNotFoundError:
        return None  # replaced between the two looks: looked at again at the next poll
    except (OSError, ValueError) as exc:
        raise Refused(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise Refused(f"{path}: not a fedfleet exchange manifest (format {_get(body, 'format')!r}, expected {FORMAT})")
    return body, hashlib.sha256(data).hexdigest()


def verify(path: Path, expect: dict[str, Any], spec: ParamSpec | None) -> Published | None:
    """The manifest at ``path`` and its params once every check passes; None when no manifest exists yet.

    ``expect``: fields the manifest must have exactly (session, party, round, kind); ``spec``: the layout the params
    must have (None: any, taken from the file). Raises Refused naming the file that fails."""
    found = checked_manifest(path, expect, spec)
    if found is None:
        return None
    body, digest = found
    files, names = body["files"], body["params"]
    where: dict[str, Path] = {}
    params = None
    if "boxes" in body:  # pieces of tensors by name and offset, e.g. one file per rank (boxes.py)
        from fedfleet.runtime.files.boxes import assemble

        blobs = {file: read_listed(path.parent / file, entry) for file, entry in files.items()}  # all checked
        params = assemble(path, {f: b for f, b in blobs.items() if f in names}, body["boxes"], spec)
        where.update({name: path for name in params.spec.names})
    elif spec is not None and len(spec.sizes) == 1:
        try:
            params = _in_place(path, files, names, spec, where)
        except _NotInPlace:
            where.clear()  # not laid out as fedfleet publishes: read again the general way
    if params is None:
        params = _by_views(path, files, names, spec, where)
    if not params.isfinite():
        bad = next(n for n, t in params.tensors().items() if not bool(torch.isfinite(t).all()))
        raise Refused(f"{where[bad]}: holds NaN or infinite values ({bad})")
    return Published(body, params, path, digest)


def checked_manifest(path: Path, expect: dict[str, Any], spec: ParamSpec | None) -> tuple[dict[str, Any], str] | None:
    """The manifest at ``path`` and the SHA-256 of its bytes once its fields are checked (``expect``'s values, plain
    file names, every params file listed with a sum, the layout ``spec``'s); None when there is none yet."""
    found = _read_manifest(path)
    if found is None:
        return None
    body, digest = found
    for key, want in expect.items():
        if body.get(key) != want:
            raise Refused(f"{path}: {key} is {_get(body, key)!r}, expected {want!r}")
    files, names = body.get("files"), body.get("params")
    if not isinstance(files, dict) or not isinstance(names, list) or not names:
        raise Refused(f"{path}: lists no params files")
    for file in [*files, *names]:
        if not isinstance(file, str) or not _NAME.match(file):
            raise Refused(f"{path}: file name {file!r} is not a plain name in the manifest's folder")
    if unlisted := [n for n in names if n not in files]:
        raise Refused(f"{path}: params file {unlisted[0]} has no sha256 and size in the manifest")
    if spec is not None and body.get("layout") != layout(spec):
        raise Refused(f"{path}: its params' layout is not the global model's")
    return body, digest


class _NotInPlace(Exception):
    """A shard whose tensors are not the next run of the global layout (a file fedfleet did not write)."""


def _in_place(path: Path, files: dict, names: list, spec: ParamSpec, where: dict[str, Path]) -> FlatParams:
    """Every shard's data read straight into the global layout's buffer (one dtype): fedfleet publishes shards in
    the layout's order, so a shard's tensors are the next run of the buffer. The bytes are hashed as they arrive,
    and the header is parsed only once the shard's SHA-256 is the manifest's; a header that describes other
    tensors or other places raises _NotInPlace."""
    flat = FlatParams.zeros(spec)
    (buffer,) = flat.buffers.values()
    target = memoryview(buffer.view(torch.uint8).numpy())
    itemsize = buffer.element_size()
    cursor = 0
    for file, entry in files.items():
        if file not in names:
            read_listed(path.parent / file, entry)  # checked all the same
            continue
        text, region = _read_shard_into(path.parent / file, entry, target, cursor)
        try:
            tensors = parse_header(text, len(region))
        except ValueError as exc:
            raise Refused(f"{path.parent / file}: not a safetensors file ({_line(exc)})") from None
        for name, dtype, shape, begin, _ in tensors:
            if name not in spec or name in where:
                raise _NotInPlace
            want = spec[name]
            if (dtype, tuple(shape), cursor + begin) != (want.dtype, want.shape, want.offset * itemsize):
                raise _NotInPlace
            where[name] = path.parent / file
        cursor += len(region)
    return _complete(flat, where, path)


def _read_shard_into(file: Path, entry: Any, target: memoryview, cursor: int) -> tuple[bytes, memoryview]:
    """A listed shard's header bytes, and its data read into ``target`` at ``cursor``, once size and SHA-256 are
    the manifest's."""
    size = listed_size(file, entry)
    with open_published(file) as f:
        prefix = f.read(8)
        try:
            text = f.read(header_length(prefix, size))
        except ValueError:
            raise _NotInPlace from None
        length = size - 8 - len(text)
        if cursor + length > len(target):
            raise _NotInPlace
        region = target[cursor : cursor + length]
        got = 0
        while got < length and (n := f.readinto(region[got:])):
            got += n
    digest = hashlib.sha256(prefix)
    digest.update(text)
    digest.update(region)
    if got != length or digest.hexdigest() != entry["sha256"]:
        raise Refused(f"{file}: its SHA-256 is not the manifest's (damaged or replaced)")
    return text, region


def _by_views(path: Path, files: dict, names: list, spec: ParamSpec | None, where: dict[str, Path]) -> FlatParams:
    """One shard's bytes in memory at a time: checked, parsed into views, copied into the flat params, dropped."""
    flat = None if spec is None else FlatParams.zeros(spec)
    views = {} if flat is None else flat.tensors()
    named: dict[str, torch.Tensor] = {}
    for file, entry in files.items():
        blob = read_listed(path.parent / file, entry)
        if file not in names:
            continue
        try:
            tensors = tensors_in(blob)
        except ValueError as exc:
            raise Refused(f"{path.parent / file}: not a safetensors file ({_line(exc)})") from None
        for key, tensor in tensors.items():
            if key in where:
                raise Refused(f"{path.parent / file}: {key} is in {where[key].name} too")
            where[key] = path.parent / file
            if flat is None:
                named[key] = tensor.clone()
            else:
                _copy_into(views, flat.spec, key, tensor, where[key])
    return FlatParams.from_tensors(named) if flat is None else _complete(flat, where, path)


def _copy_into(views: dict[str, torch.Tensor], spec: ParamSpec, name: str, tensor: torch.Tensor, file: Path) -> None:
    """One tensor of a shard into its place in the global layout; a foreign or misshapen one names the shard."""
    if name not in spec:
        raise Refused(f"{file}: holds {name}, which the global model has not")
    if tuple(tensor.shape) != spec[name].shape or tensor.dtype != spec[name].dtype:
        raise Refused(f"{file}: {name} is {list(tensor.shape)} {tensor.dtype}, expected "
                      f"{list(spec[name].shape)} {spec[name].dtype}")  # fmt: skip
    views[name].copy_(tensor)


def _complete(flat: FlatParams, where: dict[str, Path], path: Path) -> FlatParams:
    if missing := [n for n in flat.spec.names if n not in where]:
        raise Refused(f"{path}: {missing[0]} is in none of its params files")
    return flat


def read_listed(path: Path, entry: Any) -> bytearray:
    """The bytes of a file a manifest lists, once their size and SHA-256 are the manifest's."""
    size = listed_size(path, entry)
    data = read_bytes(path)
    if len(data) != size or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise Refused(f"{path}: its SHA-256 is not the manifest's (damaged or replaced)")
    return data


def listed_size(path: Path, entry: Any) -> int:
    """The size a manifest entry gives, once the file has it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _count(entry.get("bytes")):
        raise Refused(f"{path}: its manifest entry has no sha256 and bytes")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise Refused(f"{path}: listed in the manifest but missing") from None
    if size != entry["bytes"]:
        raise Refused(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    return size


def open_published(path: Path) -> BinaryIO:
    """Every read of a published file opens it here (tests watch it)."""
    return open(path, "rb", buffering=0)  # the caller's with-block closes it


def read_bytes(path: Path) -> bytearray:
    """A published file whole, in one read into a buffer of its size, which parsed tensors then view."""
    with open_published(path) as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view, got = memoryview(data), 0
        while got < len(data) and (n := f.readinto(view[got:])):
            got += n
    return data if got == len(data) else data[:got]


def finite_weight(body: dict[str, Any], path: Path) -> float:
    weight = body.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise Refused(f"{path}: weight {weight!r} is not a finite number above 0")
    return float(weight)


def metrics_of(body: dict[str, Any], path: Path) -> dict[str, float]:
    metrics = body.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in metrics.items()
    ):
        raise Refused(f"{path}: metrics must map names to finite numbers")
    return {k: float(v) for k, v in metrics.items()}


def prune(exchange: Exchange, keep_last: int, current: int) -> list[Path]:
    """Remove the files of rounds before the last ``keep_last`` (counting ``current``) that a manifest of this
    runtime lists, then those manifests, then folders left empty; anything else stays. Returns what was removed."""
    removed: list[Path] = []
    for rnd in exchange.rounds():
        if rnd > current - keep_last:
            continue
        folder = exchange.round_dir(rnd)
        manifests = [folder / "global" / MANIFEST, *sorted((folder / "updates").glob(f"*/{MANIFEST}"))]
        for manifest in manifests:
            try:
                body = read_manifest(manifest)
            except Refused:
                continue  # not ours: leave it and what it names
            if body is None:
                continue
            for name in body.get("files", {}) if isinstance(body.get("files"), dict) else ():
                if isinstance(name, str) and _NAME.match(name) and (manifest.parent / name).is_file():
                    (manifest.parent / name).unlink()
                    removed.append(manifest.parent / name)
            manifest.unlink()
            removed.append(manifest)
        for sub in sorted(folder.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()  # only empty folders go
    return removed


def _get(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
