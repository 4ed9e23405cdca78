"""The files runtime's exchange of a large model (issue 18) beside the disk's own speed, in one script.

A LLaMA-shaped model of about 1.1B params (22 layers, hidden 2048, intermediate 5632, vocabulary 32000; random
bf16 values, 2.2 GB) goes through one round of the files runtime's exchange as a site without network does it:

1. the arbiter publishes the global model (``runtime.files.exchange.publish``: safetensors shards of 1 GB, each
   written to a temp name, hashed whole and per 1 MiB block as FileRuntime does, fsynced, renamed; the manifest
   last), and once more without the block sums, side by side, for what they cost;
2. the party reads it back cold (pages dropped first) through ``verify``: every shard's size and SHA-256 checked
   against the manifest before safetensors parses it, the layout checked, values checked finite;
3. the party publishes its update (the same size) and the arbiter verifies it.

Beside it, the same script measures the disk: a cold sequential read of the published shards and a sequential
write ended by an fsync (benchmarks/disk.py), and reports each step's throughput as a fraction of the matching
bandwidth, and the round's exchange time beside its I/O floor (two writes and two reads of the model at the
measured speeds).

    python benchmarks/files_exchange.py            # the 1.1B shape: about 7 GB of free disk, 8 GB of RAM
    python benchmarks/files_exchange.py --quick    # 4 layers, hidden 1024 (0.11B params); one JSON line last

Everything is written under benchmarks/out/files-exchange-<pid>/ and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchmarks.disk import drop_cache, read_bandwidth, write_bandwidth  # noqa: E402

from fedfleet.core.params import FlatParams, ParamSpec  # noqa: E402
from fedfleet.runtime.files.exchange import publish, verify  # noqa: E402
from fedfleet.runtime.files.runtime import BLOCK_BYTES  # noqa: E402

FULL = {"layers": 22, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "kv": 256}
QUICK = {"layers": 4, "hidden": 1024, "intermediate": 2816, "vocab": 32000, "kv": 256}
SHARD = 1_000_000_000


def llama_tensors(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    h, i = s["hidden"], s["intermediate"]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (s["kv"], h)}
        shapes |= {p + "self_attn.v_proj.weight": (s["kv"], h), p + "self_attn.o_proj.weight": (h, h)}
        shapes |= {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h)}
        shapes |= {p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,)}
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (s["vocab"], h)}
    return shapes


def random_params(shapes: dict[str, tuple[int, ...]]) -> FlatParams:
    """bf16 values written in place, a block at a time (no fp32 copy of the whole model)."""
    spec = ParamSpec.of({n: torch.empty(sh, dtype=torch.bfloat16, device="meta") for n, sh in shapes.items()})
    flat = FlatParams.zeros(spec)
    gen = torch.Generator().manual_seed(0)
    for buf in flat.buffers.values():
        for start in range(0, buf.numel(), 1 << 24):
            block = buf[start : start + (1 << 24)]
            block.copy_(torch.randn(block.numel(), generator=gen).mul_(0.02))
    return flat


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 0.11B-param shape; under 2 minutes")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    shard = SHARD // 10 if args.quick else SHARD
    work = ROOT / "benchmarks" / "out" / f"files-exchange-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        params = random_params(llama_tensors(shape))
        nbytes = sum(b.numel() * b.element_size() for b in params.buffers.values())
        log(f"{params.spec.numel / 1e9:.2f}B params, {nbytes / 1e9:.2f} GB of bf16, shards of {shard / 1e9:.1f} GB")
        steps = {}
        manifest = {"session": "bench", "round": 1, "kind": "global"}
        glob = work / "round-0001" / "global"
        # as FileRuntime publishes it: with a SHA-256 per block, for FSDP ranks reading only their rows
        _, steps["publish_global"] = timed(publish, glob, params, manifest, shard_bytes=shard, block_bytes=BLOCK_BYTES)
        plain = work / "plain-global"  # the same without block sums, side by side: what the second hash costs
        _, plain_s = timed(publish, plain, params, manifest, shard_bytes=shard)
        shutil.rmtree(plain)
        files = sorted(glob.glob("params*.safetensors"))
        cold = drop_cache(files)
        got, steps["verify_global"] = timed(verify, glob / "manifest.json", manifest, params.spec)
        assert got is not None and all(torch.equal(got.params.buffers[d], b) for d, b in params.buffers.items())
        del got
        update = work / "round-0001" / "updates" / "site-a"
        manifest_u = {"session": "bench", "round": 1, "kind": "update", "party": "site-a"}
        _, steps["publish_update"] = timed(publish, update, params, manifest_u, shard_bytes=shard)
        drop_cache(sorted(update.glob("params*.safetensors")))
        got, steps["verify_update"] = timed(verify, update / "manifest.json", manifest_u, params.spec)
        assert got is not None
        del got
        read_bw, read_drop = read_bandwidth(files)
        write_bw = write_bandwidth(work, min(nbytes, 1 << 30))
        floor = 2 * nbytes / write_bw + 2 * nbytes / read_bw
        total = sum(steps.values())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {
            "benchmark": "files_exchange",
            "quick": args.quick,
            "params": params.spec.numel,
            "bytes": nbytes,
            "disk_read_MBps": round(read_bw / 1e6),
            "disk_write_MBps": round(write_bw / 1e6),
            "cache_drop_took": bool(cold["took"] and read_drop["took"]),
            **{f"{k}_s": round(v, 2) for k, v in steps.items()},
            "publish_fraction_of_write": round(nbytes / steps["publish_global"] / write_bw, 3),
            "publish_global_without_block_sums_s": round(plain_s, 2),
            "block_sums_cost_ratio": round(steps["publish_global"] / plain_s, 3),
            "verify_fraction_of_read": round(nbytes / steps["verify_global"] / read_bw, 3),
            "round_exchange_s": round(total, 2),
            "io_floor_s": round(floor, 2),
            "round_fraction_of_floor": round(floor / total, 3),
            "peak_rss_GB": round(peak / 1e9, 2),
        }
        for k, v in result.items():
            log(f"  {k}: {v}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
