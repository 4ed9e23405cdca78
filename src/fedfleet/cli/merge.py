"""``fedfleet merge``: a streaming weighted merge of Hugging Face checkpoints (fedfleet.hpc.merge)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

MERGE_HELP = """\
Merge the Hugging Face checkpoints CKPT ... (a folder with model.safetensors, or with sharded files and
model.safetensors.index.json; fp32, bf16 or fp16) into the new folder OUT, a checkpoint that
from_pretrained loads: the weighted mean of every tensor, accumulated in fp32, one tensor at a time, so
memory stays about 2 x the largest tensor whatever the model's size or the number of checkpoints.

Weights: --weights (one per CKPT, any positive scale), else each CKPT's fedfleet-manifest.json ("tokens", else
"samples"; --weight-by chooses). A manifest's sha256 sums are checked before any tensor is read.

With --base and --server-opt, the mean's delta from BASE (the previous round's model) goes through a server
optimiser instead: fedavg, fedavgm, fedadam, fedyogi, fedadagrad (fedfleet's strategies, settings as in a job
file: --opt server_lr=0.1 --opt beta1=0.9) or adamw (AdamW on the pseudo-gradient, its whole-model norm clipped
to max_norm, as xFFL's example trains: --opt lr=1e-4 --opt max_norm=1.0). Its state is written into OUT as
fedfleet-server-opt.<key>.safetensors files; the next merge with --base OUT continues it.

OUT is published whole or not at all (written in a temp folder beside it, fsynced, renamed); it must not
exist. A missing shard, a tensor missing or shaped differently in one checkpoint, a NaN or an infinity, or
weights that do not sum to a positive number stop the merge with one message and no output.

examples:
  fedfleet merge merged/ site-a/ site-b/ --weights 3 1 --dtype bf16
  fedfleet merge merged/ site-a/ site-b/ site-c/               # weights from each fedfleet-manifest.json
  fedfleet merge round-2/ a/ b/ --base round-1/ --server-opt fedadam --opt server_lr=0.05
  fedfleet merge round-2/ a/ b/ --base round-1/ --server-opt adamw --opt lr=1e-4 --max-shard-size 2GB
"""


def add_merge_parser(sub: Any) -> argparse.ArgumentParser:
    merge = sub.add_parser(
        "merge",
        help="merge Hugging Face checkpoints by a weighted mean, streaming (optionally a server-optimiser step)",
        description=MERGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("out", metavar="OUT", help="the new checkpoint folder (must not exist)")
    merge.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoint folders (or .safetensors files)")
    merge.add_argument(
        "--weights",
        nargs="+",
        metavar="W",
        help="one weight per CKPT (e.g. tokens seen; normalised), also as one comma-separated list",
    )
    merge.add_argument(
        "--weight-by",
        choices=("tokens", "samples"),
        help="which count of the manifests weights the checkpoints (default: tokens if every one has them)",
    )
    merge.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="the output's dtype (default auto: each tensor as the first CKPT stores it)",
    )
    merge.add_argument(
        "--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard, e.g. 2GB, 500MB (default 5GB)"
    )
    merge.add_argument("--base", metavar="DIR", help="the previous round's model: the server optimiser steps from it")
    merge.add_argument("--server-opt", metavar="NAME", help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad or adamw")
    merge.add_argument(
        "--opt",
        dest="opt_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the server optimiser (repeatable): --opt server_lr=0.1",
    )
    merge.add_argument(
        "--reset-state", action="store_true", help="ignore the base's server-optimiser state; start a fresh one"
    )
    merge.add_argument("--quiet", action="store_true", help="no progress on stderr")
    merge.set_defaults(func=merge_command)
    return merge


def merge_command(args: argparse.Namespace) -> int:
    from fedfleet.errors import ConfigError
    from fedfleet.hpc.merge import build_server_opt, merge_checkpoints

    if (args.base is None) != (args.server_opt is None):
        raise ConfigError("--base and --server-opt go together: the optimiser steps from the base")
    if args.opt_params and args.server_opt is None:
        raise ConfigError("--opt sets the server optimiser's settings: give --server-opt too")
    opt = None if args.server_opt is None else build_server_opt(args.server_opt, _opt_params(args.opt_params))
    report = None if args.quiet else _Reporter()
    result = merge_checkpoints(
        args.out,
        args.checkpoints,
        weights=_weights(args.weights),
        weight_by=args.weight_by,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        base=args.base,
        server_opt=opt,
        reset_state=args.reset_state,
        progress=report,
    )
    weights = ", ".join(f"{w:.4g}" for w in result.weights)
    step = "" if result.step is None else f"; {args.server_opt} step {result.step}"
    clip = "" if result.clip is None or result.clip >= 1 else f" (delta clipped x{result.clip:.3g})"
    print(
        f"merged {len(result.weights)} checkpoints (weights {weights}) into {result.out}: {result.tensors} tensors, "
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s{step}{clip}"
    )
    return 0


def _weights(given: list[str] | None) -> list[float] | None:
    from fedfleet.errors import ConfigError

    if not given:
        return None
    parts = [p for g in given for p in g.split(",") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--weights {' '.join(given)}: give numbers, one per checkpoint") from None


def _opt_params(items: list[str]) -> dict[str, float]:
    from fedfleet.errors import ConfigError

    params: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt {item!r}: expected KEY=VALUE, e.g. --opt server_lr=0.1")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--opt {item!r}: {key.strip()} must be a number") from None
    return params


class _Reporter:
    """Tensors done and bytes read on stderr, at most once a second and at the end of each pass."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if now - self.last < 1.0 and p.tensors_done < p.tensors_total:
            return
        self.last = now
        what = "norm of the delta" if p.stage == "norm" else "merge"
        print(
            f"{what}: {p.tensors_done}/{p.tensors_total} tensors, {p.bytes_read / 1e9:.2f}/"
            f"{p.bytes_total / 1e9:.2f} GB read, {p.bytes_read / max(p.seconds, 1e-9) / 1e6:.0f} MB/s",
            file=sys.stderr,
            flush=True,
        )
