"""The streaming weighted merge: N checkpoints in, one out, a block of rows at a time.

For every tensor, in the first checkpoint's order, and every block of its rows (``BLOCK`` elements at most):
each x_i is read and converted to fp32 on a read-ahead thread; the main thread folds it into the weighted
mean (fp32) and checks the mean finite; a server-optimiser step from the base optionally moves the result; a
writer thread casts it to the output dtype, hashes and writes it. Disk, conversion, arithmetic and hashing
overlap. Memory is a handful of 4 MiB blocks (those being loaded, the accumulator, those queued for writing):
40-80 MB on top of the interpreter, measured, whatever the size of the model, of its largest tensor, or the
number of checkpoints. A server optimiser adds the base block, its state blocks and the step's temporaries.

Everything that can be checked before writing is (layouts, weights, manifests' sums, the optimiser's state);
what only reading finds (a NaN) aborts the merge with the output never published.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedfleet.hpc.merge.blocks import Buffers, Piece, all_finite, check_finite, is_last, load, pieces, read_ahead
from fedfleet.hpc.merge.checkpoint import DTYPES, INDEX, Checkpoint, check_same_layout, dtype_name
from fedfleet.hpc.merge.errors import MergeError
from fedfleet.hpc.merge.manifest import MANIFEST, Manifest, read_manifest, resolve_weights, verify
from fedfleet.hpc.merge.server_opt import ServerOpt, StepInfo
from fedfleet.hpc.merge.state import StateIn, open_state_out
from fedfleet.hpc.merge.writer import Entry, ShardWriter, Staging, index_json, parse_size, plan_shards

COPIED = ("config.json", "generation_config.json")  # beside the weights; config.json's dtype is updated


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_read: int
    bytes_total: int
    seconds: float
    stage: str  # "norm" (adamw's first pass) or "merge"


@dataclass(frozen=True)
class MergeResult:
    out: Path
    weights: list[float]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    step: int | None = None  # the server optimiser's step count after this merge
    clip: float | None = None  # adamw: the factor the mean delta's norm was clipped by


def merge_checkpoints(
    out: str | Path,
    checkpoints: Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    weight_by: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    base: str | Path | None = None,
    server_opt: ServerOpt | None = None,
    reset_state: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> MergeResult:
    """Merge ``checkpoints`` into the new folder ``out`` (an HF checkpoint ``from_pretrained`` loads).

    weights: one per checkpoint (any positive scale), else each checkpoint's manifest (``weight_by``: tokens or
    samples; tokens when every manifest has them). dtype: auto (each tensor as the first checkpoint stores
    it), bf16, fp16 or fp32. base + server_opt: a server-optimiser step on the mean delta from ``base``, its
    state read from ``base`` and written into ``out``.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise MergeError(f"{out} already exists: choose a new output folder (merge never replaces one)")
    if not checkpoints:
        raise MergeError("no checkpoints to merge")
    if (base is None) != (server_opt is None):
        raise MergeError("a server-optimiser step needs both a base checkpoint and a server optimiser")
    if dtype != "auto" and dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    ckpts = [Checkpoint(p) for p in checkpoints]
    base_ckpt = Checkpoint(base) if base is not None else None
    check_same_layout(ckpts if base_ckpt is None else [*ckpts, base_ckpt])
    manifests = [read_manifest(c.folder) for c in ckpts]
    norm_weights = resolve_weights([c.folder for c in ckpts], manifests, list(weights) if weights else None, weight_by)
    source = base_ckpt or ckpts[0]
    copied = [source.folder / n for n in COPIED if (source.folder / n).is_file()]
    layout = {name: info.shape for name, info in ckpts[0].tensors.items()}
    state = None if server_opt is None else StateIn(server_opt, source.folder, layout, reset_state)
    for ck in [*ckpts, base_ckpt]:
        manifest = None if ck is None else read_manifest(ck.folder)
        if ck is not None and manifest is not None and manifest.sha256:
            extra = (copied + (state.files if state else [])) if ck is source else []
            verify(ck.folder, manifest, ck.files + extra)

    entries: list[Entry] = [
        (n, i.shape, i.dtype if dtype == "auto" else DTYPES[dtype]) for n, i in ckpts[0].tensors.items()
    ]
    shards = plan_shards(entries, parse_size(max_shard_size))
    step = None if state is None else state.step + 1
    inputs = sum(c.nbytes for c in ckpts) + (base_ckpt.nbytes if base_ckpt else 0)
    clip = None
    if server_opt is not None and server_opt.needs_norm:
        assert base_ckpt is not None
        first = _Meter(len(entries), inputs, started, progress, "norm")
        norm = _delta_norm(ckpts, norm_weights, base_ckpt, first, Buffers())
        clip = server_opt.clip_factor(norm)
    meter = _Meter(len(entries), inputs + (state.nbytes if state else 0), started, progress)

    with Staging(out) as stage:
        state_out = {} if server_opt is None else open_state_out(stage.tmp, server_opt, layout, step or 0)
        buffers = Buffers()
        merged = _merged(ckpts, norm_weights, base_ckpt, server_opt, state, step, clip, meter, buffers)
        _write(stage, shards, merged, ckpts, state_out, meter, buffers)
        if len(shards) > 1:
            stage.write_text(INDEX, index_json(shards))
        for path in copied:
            stage.write_text(path.name, _config_text(path, dtype) if path.name == "config.json" else path.read_text())
        info: dict[str, object] = {"inputs": len(ckpts), "weights": norm_weights, "dtype": dtype}
        if server_opt is not None and state is not None:
            info.update(server_opt=json.loads(server_opt.describe()), step=step, fresh_state=state.fresh)
        stage.write_text(MANIFEST, Manifest(sha256=dict(stage.sums), merge=info).to_json())
        stage.commit()
    written = sum(f.stat().st_size for f in out.iterdir())
    return MergeResult(out, norm_weights, len(entries), meter.read, written, time.perf_counter() - started, step, clip)


def _write(
    stage: Staging,
    shards: list[tuple[str, list[Entry]]],
    merged: Iterator[tuple[Piece, torch.Tensor, dict[str, torch.Tensor] | None]],
    ckpts: list[Checkpoint],
    state_out: dict[str, ShardWriter],
    meter: _Meter,
    buffers: Buffers,
) -> None:
    """Every merged piece into its shard (one shard file open at a time) and its state into the state files."""
    unclosed = list(state_out.values())
    try:
        for file, group in shards:
            writer = ShardWriter(stage.tmp / file, group)
            unclosed.append(writer)
            for name, _, out_dtype in group:
                for _ in pieces(ckpts[0], [name]):
                    (got, _), tensor, opt_state = next(merged)
                    assert got == name
                    _check_range(tensor, name, out_dtype)
                    writer.write(name, tensor, buffers.give)  # its block is free again once written
                    for key, value in (opt_state or {}).items():
                        state_out[key].write(name, value)
                meter.tick()
            unclosed.remove(writer)
            stage.sums[file] = writer.close()
        for w in state_out.values():
            unclosed.remove(w)
            stage.sums[w.path.name] = w.close()
    except BaseException:
        for w in unclosed:
            w.discard()
        raise


def _merged(
    ckpts: list[Checkpoint],
    weights: list[float],
    base: Checkpoint | None,
    opt: ServerOpt | None,
    state: StateIn | None,
    step: int | None,
    clip: float | None,
    meter: _Meter,
    buffers: Buffers,
) -> Iterator[tuple[Piece, torch.Tensor, dict[str, torch.Tensor] | None]]:
    """(piece, merged fp32 block, the block's new optimiser state or None) for every piece, in order."""
    for piece, acc in _weighted_sums(ckpts, weights, meter, buffers):
        if base is None or opt is None or state is None:
            yield piece, acc, None
            continue
        w = load(base, piece, buffers)  # fp32, a block of its own: the step moves it in place
        if not all_finite(w):
            check_finite([base], piece)
        meter.add(w.numel() * base.tensors[piece[0]].dtype.itemsize)
        opt_state = state.read(piece[0], piece[1], w)
        meter.add(0 if state.fresh else 4 * w.numel() * len(opt_state))
        opt.step(w, acc.sub_(w), opt_state, StepInfo(step or 1, 1.0 if clip is None else clip))
        buffers.give(acc)  # the delta: the step is done with it
        if not all_finite(w):
            raise MergeError(f"tensor {piece[0]!r}: the server-optimiser step gave NaN or infinite values")
        yield piece, w, opt_state


def _weighted_sums(
    ckpts: list[Checkpoint], weights: list[float], meter: _Meter, buffers: Buffers
) -> Iterator[tuple[Piece, torch.Tensor]]:
    """The weighted mean of every piece, as a running lerp: acc <- acc + (w_i / (w_0 + ... + w_i)) (x_i - acc).
    One fused pass per input after the first (whose fp32 copy becomes the accumulator), against three for
    multiply, convert and add; the inputs arrive in fp32 and checked from the read-ahead thread."""
    acc: torch.Tensor | None = None
    seen = 0.0
    for (piece, i), x in read_ahead(ckpts, pieces(ckpts[0]), buffers):
        meter.add(x.numel() * ckpts[i].tensors[piece[0]].dtype.itemsize)
        seen = weights[i] if i == 0 else seen + weights[i]
        if i == 0:
            acc = x
        else:
            assert acc is not None
            acc.lerp_(x, weights[i] / seen if seen > 0 else 1.0)  # all zero so far: x replaces acc
            buffers.give(x)
        del x
        if i == len(ckpts) - 1:
            assert acc is not None
            if not all_finite(acc):  # a NaN or inf in any input reaches the mean, whatever its weight
                check_finite(ckpts, piece)
            yield piece, acc
            acc = None


def _delta_norm(
    ckpts: list[Checkpoint], weights: list[float], base: Checkpoint, meter: _Meter, buffers: Buffers
) -> float:
    """The L2 norm of the whole mean delta (mean - base), a pass of its own: what clipping needs up front."""
    total = 0.0
    for piece, acc in _weighted_sums(ckpts, weights, meter, buffers):
        b = load(base, piece, buffers)
        meter.add(b.numel() * base.tensors[piece[0]].dtype.itemsize)
        total += float(torch.linalg.vector_norm(acc.sub_(b))) ** 2
        buffers.give(acc)
        buffers.give(b)
        if is_last(piece, ckpts[0]):
            meter.tick()
    return math.sqrt(total)


def _check_range(t: torch.Tensor, name: str, out: torch.dtype) -> None:
    """fp16's range is 65504: a merged value beyond it would be written as inf. (bf16 and fp32 share fp32's.)"""
    if out != torch.float16 or not t.numel():
        return
    lo, hi = (float(x) for x in torch.aminmax(t))
    if max(-lo, hi) > torch.finfo(out).max:
        raise MergeError(
            f"tensor {name!r}: merged values reach {max(-lo, hi):.4g}, beyond {dtype_name(out)}'s range "
            f"({torch.finfo(out).max:.4g}); choose --dtype bf16 or fp32"
        )


def _config_text(path: Path, dtype: str) -> str:
    """config.json with its dtype set to the output's (as save_pretrained writes it); else the file as it is."""
    text = path.read_text()
    if dtype == "auto":
        return text
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise MergeError(f"{path}: not readable JSON ({exc})") from None
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


class _Meter:
    def __init__(self, tensors: int, total: int, started: float, report: Callable | None, stage: str = "merge"):
        self.tensors, self.total, self.started, self.report, self.stage = tensors, total, started, report, stage
        self.done = self.read = 0

    def add(self, nbytes: int) -> None:
        self.read += nbytes

    def tick(self) -> None:
        self.done += 1
        if self.report is not None:
            seconds = time.perf_counter() - self.started
            self.report(Progress(self.done, self.tensors, self.read, self.total, seconds, self.stage))


__all__ = ["MergeResult", "Progress", "merge_checkpoints"]
