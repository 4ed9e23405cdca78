"""``fedfleet merge`` (issue 17) beside the guide's whole-model averaging: peak memory and throughput.

Two LLaMA-shaped checkpoints of about 1.1B params (22 layers, hidden 2048, intermediate 5632, vocabulary 32000,
untied embeddings; random bf16 weights, ~2.2 GB each), generated tensor by tensor and written shard by shard
with safetensors (never through a model object), in two shard layouts (1 GB and 500 MB shards). Then, each in
a subprocess of its own with the inputs' pages dropped from the page cache first:

1. stream: ``fedfleet.hpc.merge.merge_checkpoints`` to bf16 (weights 3:1), ``--repeats`` times;
2. whole: the guide's approach (xFFL's aggregation script): ``from_pretrained`` every model whole in fp32,
   average the state dicts, load the average, ``save_pretrained`` in bf16.

Each child reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, and /proc's VmHWM beside
it) and its wall time. Children start from a parent that never imports torch and writes the checkpoints in a
child too: on Linux a forked child's ru_maxrss starts at its parent's. The same script measures the disk's
sequential read bandwidth on the same files (8 MiB reads with the pages dropped by ``posix_fadvise(DONTNEED)``
before; whether the drop took is checked against /proc/meminfo's Cached and reported) and its sequential write
bandwidth with an fsync, so the stream's throughput (input bytes / merge seconds) is a fraction of the first,
and the I/O floor (inputs at the read bandwidth, output at the write bandwidth) is beside it.

Targets: stream peak RSS <= 300 MB + 2 x the largest tensor in fp32; >= 10x less than whole; throughput
>= 70% of the disk's read bandwidth.

    python benchmarks/merge.py            # the 1.1B shape: ~8 GB free disk; ~17 GB free RAM for the whole side
    python benchmarks/merge.py --quick    # 4 layers, hidden 1024 (0.11B params); prints one JSON line last

Everything is written under benchmarks/out/merge-<pid>/ and removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.disk import drop_cache, read_bandwidth, write_bandwidth  # noqa: E402

FULL = {"layers": 22, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 32, "kv_heads": 4}
QUICK = {"layers": 4, "hidden": 1024, "intermediate": 2816, "vocab": 32000, "heads": 16, "kv_heads": 4}
LAYOUTS = (1_000_000_000, 500_000_000)  # shard sizes of the two checkpoints (quick: divided by 10)


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def llama_shapes(s: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of LlamaForCausalLM for shape ``s``, in the order save_pretrained writes them."""
    h, i, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    shapes = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return [*shapes, ("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(folder: Path, s: dict[str, int], seed: int, shard_bytes: int) -> list[Path]:
    """Random bf16 weights, one shard in memory at a time (save_file per shard), an index and a config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_shapes(s):
        if groups[-1] and size + 2 * numel(shape) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += 2 * numel(shape)
    weight_map, files = {}, []
    for k, group in enumerate(groups):
        file = folder / f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16) for n, shape in group}
        save_file(shard, str(file), metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys((n for n, _ in group), file.name))
        files.append(file)
    total = sum(2 * numel(sh) for _, sh in llama_shapes(s))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.to_json_file(str(folder / "config.json"))
    for f in files:  # dirty pages cannot be dropped: flush them now
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return files


def child(kind: str, out: str, inputs: list[str]) -> None:
    """One measured run; prints its JSON (seconds, peak RSS) as the last line."""
    import torch

    if kind == "write":  # the inputs, written by a child: the parent stays small (see vm_hwm)
        shape = json.loads(inputs[0])
        files = [
            write_checkpoint(Path(out) / n, shape, k, int(size)) for k, (n, size) in enumerate(json.loads(inputs[1]))
        ]
        print(json.dumps([[str(f) for f in group] for group in files]))
        return

    if kind == "stream":
        from fedfleet.hpc.merge import merge_checkpoints

        last: list[float] = [0.0]
        start = time.perf_counter()
        merge_checkpoints(
            out,
            inputs,
            weights=[3, 1],
            dtype="bf16",
            max_shard_size="2GB",
            progress=lambda p: last.__setitem__(0, p.seconds),
        )
        merged_by = last[0]  # the last tensor handed to the writer; after it: the queued writes, fsyncs, the rename
    else:  # the guide's aggregation: every model whole, in fp32
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        merged_by = None
        states, model = [], None
        for path in inputs:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            states.append(model.state_dict())
        weights = [0.75, 0.25]
        averaged = {k: sum(w * sd[k] for w, sd in zip(weights, states, strict=True)) for k in states[0]}
        model.load_state_dict(averaged)
        model.to(torch.bfloat16).save_pretrained(out, max_shard_size="2GB")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "merged_by": merged_by, "peak_rss": peak, "vm_hwm": vm_hwm()}))


def vm_hwm() -> int:
    """This process's own peak RSS from /proc (ru_maxrss also keeps the parent's at the fork, on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def run_child(kind: str, out: Path, inputs: list[str]) -> Any:
    cmd = [sys.executable, __file__, "--child", kind, str(out), *inputs]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(kind: str, out: Path, inputs: list[Path], files: list[Path]) -> dict[str, Any]:
    dropped = drop_cache(files)
    result = run_child(kind, out, [str(p) for p in inputs])
    result["output_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    return {**result, "cache_drop_took": dropped["took"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 116M-param shape; under 2 minutes")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-model side (RAM)")
    parser.add_argument("--repeats", type=int, default=3, help="stream runs (the median is reported)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # before any other import: benchmarks.common's imports would count in the child's RSS
        child(args.child[0], args.child[1], args.child[2:])
        return

    shape = QUICK if args.quick else FULL
    shapes = llama_shapes(shape)
    params = sum(numel(sh) for _, sh in shapes)
    ckpt_bytes = 2 * params
    largest_fp32 = 4 * max(numel(sh) for _, sh in shapes)
    work = ROOT / "benchmarks" / "out" / f"merge-{os.getpid()}"
    work.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work.parent).free
    need = 3 * ckpt_bytes + ckpt_bytes // 2  # two inputs and one output at a time, and a margin
    if free < need:
        sys.exit(f"benchmarks/merge.py: {free / 1e9:.1f} GB free under benchmarks/out, {need / 1e9:.1f} GB needed")
    load_start = round(os.getloadavg()[0], 2)
    log(f"{params / 1e9:.2f}B params, {ckpt_bytes / 1e9:.2f} GB per checkpoint; {free / 1e9:.0f} GB free disk")
    try:
        t0 = time.perf_counter()
        scale = 10 if args.quick else 1
        layouts = [["a", LAYOUTS[0] // scale], ["b", LAYOUTS[1] // scale]]
        a_files, b_files = (
            list(map(Path, g)) for g in run_child("write", work, [json.dumps(shape), json.dumps(layouts)])
        )
        files = a_files + b_files
        log(f"wrote two checkpoints ({len(a_files)} and {len(b_files)} shards) in {time.perf_counter() - t0:.0f} s")
        bandwidth, dropped = read_bandwidth(files)
        log(f"disk sequential read: {bandwidth / 1e6:.0f} MB/s (page-cache drop took: {dropped['took']})")
        write_bw = write_bandwidth(work, min(ckpt_bytes, 1 << 30))
        log(f"disk sequential write + fsync: {write_bw / 1e6:.0f} MB/s")
        runs = []
        for _ in range(args.repeats):
            stream = measure("stream", work / "stream", [work / "a", work / "b"], files)
            stream["throughput"] = 2 * ckpt_bytes / stream["seconds"]
            log(f"stream: {stream['seconds']:.1f} s (last tensor at {stream['merged_by']:.1f} s), "
                f"peak RSS {stream['peak_rss'] / 1e6:.0f} MB "
                f"(VmHWM {stream['vm_hwm'] / 1e6:.0f} MB), {stream['throughput'] / 1e6:.0f} MB/s")  # fmt: skip
            runs.append(stream)
        stream = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
        whole = None
        if not args.no_whole:
            whole = measure("whole", work / "whole", [work / "a", work / "b"], files)
            log(f"whole: {whole['seconds']:.1f} s, peak RSS {whole['peak_rss'] / 1e6:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = 2 * ckpt_bytes / bandwidth + stream["output_bytes"] / write_bw  # read both, write one, same disk

    # only now: benchmarks.common imports torch, and a child forked from a big parent inherits its ru_maxrss
    from benchmarks.common import cpu_model_name, emit, load_average

    budget = 300e6 + 2 * largest_fp32
    result = {
        "benchmark": "merge",
        "quick": args.quick,
        "params": params,
        "checkpoint_bytes": ckpt_bytes,
        "largest_tensor_fp32_bytes": largest_fp32,
        "disk_read_bytes_per_s": round(bandwidth),
        "page_cache_drop_took": dropped["took"],
        "disk_write_fsync_bytes_per_s": round(write_bw),
        "io_floor_seconds": round(floor, 2),
        "stream_seconds": round(stream["seconds"], 2),
        "stream_seconds_runs": [round(r["seconds"], 2) for r in runs],
        "stream_last_tensor_at_runs": [round(r["merged_by"], 2) for r in runs],
        "stream_vm_hwm": stream["vm_hwm"],
        "stream_peak_rss": stream["peak_rss"],
        "stream_rss_budget": int(budget),
        "stream_throughput_bytes_per_s": round(stream["throughput"]),
        "throughput_vs_disk": round(stream["throughput"] / bandwidth, 3),
        "whole_seconds": None if whole is None else round(whole["seconds"], 2),
        "whole_peak_rss": None if whole is None else whole["peak_rss"],
        "whole_vm_hwm": None if whole is None else whole["vm_hwm"],
        "rss_ratio_whole_over_stream": None if whole is None else round(whole["peak_rss"] / stream["peak_rss"], 1),
        "meets_rss_budget": stream["peak_rss"] <= budget,
        "meets_10x": None if whole is None else whole["peak_rss"] >= 10 * stream["peak_rss"],
        "meets_70pct_disk": stream["throughput"] >= 0.7 * bandwidth,
        "cpu": cpu_model_name(),
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": load_average(),
    }
    emit(result)


if __name__ == "__main__":
    main()
