"""Offsite-Tuning sub-model fine-tuning vs full fine-tuning, side by side: throughput and peak memory.

Modes (each runs in a fresh subprocess so its peak memory is its own):
- ``full``: every parameter of the full model trains (AdamW);
- ``offsite``: the sub model (bottom adapter + uniform-stride emulator + top adapter) with the adapters trainable;
- ``offsite_lora``: the same sub model with LoRA (r=8) on the adapters only (the paper's best setting).

Full run (a GPU): the GPT2-XL shape (48 blocks, hidden 1600, 25 heads, random weights), bf16 weights, block 512,
a 2-16-2 emulator, batch 4. ``--quick``: a tiny GPT-2 shape on the CPU (12 blocks, hidden 128, block 64, 2-4-2,
vocabulary 1024),
fp32, under 2 minutes. Throughput is training tokens per second over timed steps after warm-up; peak memory is
``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on the CPU. ``flop_model_x`` is the throughput ratio the
matmul FLOPs alone allow (``step_flops``). The last stdout line is one JSON object.

    python benchmarks/offsite_vs_full.py --quick
    python benchmarks/offsite_vs_full.py            # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from common import cpu_model_name, emit, load_average, log

MODES = ("full", "offsite", "offsite_lora")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    block: int
    batch: int
    emulator: int
    adapters: int  # top = bottom
    dtype: str
    steps: int
    warmup: int
    vocab: int = 50257


FULL = Shape(
    layers=48, hidden=1600, heads=25, block=512, batch=4, emulator=16, adapters=2, dtype="bfloat16", steps=10, warmup=3
)
# the quick shape's vocabulary is small so that, as in GPT2-XL, the blocks (not the LM head) dominate the step
QUICK = Shape(
    layers=12,
    hidden=128,
    heads=4,
    block=64,
    batch=4,
    emulator=4,
    adapters=2,
    dtype="float32",
    steps=20,  # steps of 0.06-0.13 s: fewer are dominated by the machine's noise
    warmup=2,
    vocab=1024,
)


def step_flops(mode: str, shape: Shape) -> float:
    """Where a training step's time should go, as matmul FLOPs per token: the throughput ratio the compute alone
    allows, to hold the measured ratios against.

    A block's forward is 24 h^2 (QKV 6, output 2, MLP 16) + 4 T h (attention over T tokens); the LM head's
    2 h V. A backward costs 1x the forward for the input gradients and 1x more where weights train. Full:
    every block and the (tied) head train, 3x. Offsite: embeddings and head frozen, so the head and the
    emulator's blocks pass input gradients only (1x) and the adapter blocks train (2x; counted for the lowest
    block too, though its input gradient is not needed, so the model is slightly pessimistic). With LoRA the
    adapters' own weights are frozen: their blocks pass input gradients (1x) and the LoRA factors are ignored.
    """
    h, t, v = shape.hidden, shape.block, shape.vocab
    block, head = 24 * h * h + 4 * t * h, 2 * h * v
    if mode == "full":
        return 3 * (shape.layers * block + head)
    kept = 2 * shape.adapters + shape.emulator
    adapter_backward = (1 if mode == "offsite_lora" else 2) * 2 * shape.adapters * block
    return kept * block + head + head + shape.emulator * block + adapter_backward


def build(mode: str, shape: Shape, device: str) -> torch.nn.Module:
    from transformers import GPT2Config

    from fedfleet.offsite import AutoMainModel, AutoSubModel
    from fedfleet.offsite.tuning import LoraSettings, tunable

    config = GPT2Config(
        n_layer=shape.layers,
        n_embd=shape.hidden,
        n_head=shape.heads,
        n_positions=shape.block,
        vocab_size=shape.vocab,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    dtype = getattr(torch, shape.dtype)
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of GPT2-XL on the way
    try:
        if mode == "full":
            model = AutoMainModel(config, shape.emulator, shape.adapters, shape.adapters).model
            for p in model.parameters():
                p.requires_grad_(True)
            return model.to(device)
        # the data owner's side: only the sub model exists (built from the config, as a data owner does)
        sub = AutoSubModel(config, shape.emulator, shape.adapters, shape.adapters)
        model = tunable(sub, LoraSettings(r=8, alpha=16) if mode == "offsite_lora" else None)
        return model.to(device)
    finally:
        torch.set_default_dtype(torch.float32)


def run_mode(mode: str, shape: Shape) -> dict[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build(mode, shape, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.block), device=device)
    times = []
    for step in range(shape.warmup + shape.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= shape.warmup:
            times.append(time.perf_counter() - t)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "tokens_per_s": shape.batch * shape.block * len(times) / sum(times),
        "step_s": sum(times) / len(times),
        "peak_bytes": float(peak),
        "params": float(sum(p.numel() for p in model.parameters())),
        "trainable": float(sum(p.numel() for p in params)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape on the CPU, < 2 minutes")
    parser.add_argument("--mode", choices=MODES, help="(internal) run one mode and print its JSON")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run_mode(args.mode, shape)), flush=True)
        return
    load_start = load_average()
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--threads", str(args.threads)] + (["--quick"] * args.quick)
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        log(mode, results[mode])
    full = results["full"]
    emit(
        {
            "benchmark": "offsite_vs_full",
            "shape": asdict(shape),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model_name(),
            "torch": torch.__version__,
            "load_avg_1min": {"start": load_start, "end": load_average()},
            "modes": results,
            "throughput_x": {m: results[m]["tokens_per_s"] / full["tokens_per_s"] for m in MODES[1:]},
            "memory_x_less": {m: full["peak_bytes"] / results[m]["peak_bytes"] for m in MODES[1:]},
            # what the FLOPs alone allow; the measured throughput_x over it says how much else (memory
            # traffic, launch overhead, the optimizer step) favours or hurts each side
            "flop_model_x": {m: step_flops("full", shape) / step_flops(m, shape) for m in MODES[1:]},
        }
    )


if __name__ == "__main__":
    main()
