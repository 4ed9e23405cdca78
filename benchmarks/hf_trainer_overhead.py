"""A fedfleet party (``FedAvgClient``) vs the plain Hugging Face ``Trainer``: the same training, side by side.

Issue 4's workload: GPT-2 sequence classification (config ``gpt2``: 124M params, random weights), batch 16,
sequence 128, on real review texts tokenized with GPT-2's BPE; every side starts from the same weights and sees
the same batches in the same order for the same steps. Rows:

- ``plain``: ``transformers.Trainer`` alone;
- ``party-epoch``: ``FedAvgClient`` syncing at the end of every epoch with a model-less arbiter
  (``FedAvgServer``) in its own process on this machine, plaintext gRPC on loopback;
- ``party-every-N``: the same, syncing every N optimizer steps (N = 50 in the full run).

Throughput is samples/s over the steps after the first ``--warmup`` ones, timed at the Trainer's step ends
after the sync callback, so a sync's round trip (gather, send, the arbiter's mean, receive, load) counts
against the party. ``sync_s`` is the time inside the syncs as the party measured it, and ``sync_share`` that
time over the timed span: the overhead measured inside each run, which run-to-run noise does not blur. Each side
is warmed up once, then the sides run interleaved ``--repeats`` times and the medians are compared. Target
(issue 4): ``party-epoch`` keeps >= 97% of ``plain``'s samples/s.

The party's final weights are compared with the plain Trainer's: with one party the arbiter's mean is the
party's own params in delta form (global + (local - global)), equal up to float rounding, so the maximum
difference shows the federation changed nothing in the training itself.

    python benchmarks/hf_trainer_overhead.py --bf16                      # GPU: gpt2 124M
    deepspeed --num_gpus 1 benchmarks/hf_trainer_overhead.py --bf16 --deepspeed zero2   # ZeRO-2 on both sides
    python benchmarks/hf_trainer_overhead.py --quick                     # CPU: a 2-block GPT-2 (< 2 min)
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from common import emit, load_average, log, median

ARBITER = """
import sys
from fedfleet.hf import FedAvgServer, create_context
address, session = sys.argv[1], sys.argv[2]
parties = [("guest", "1"), ("arbiter", "1")]
FedAvgServer(create_context(("arbiter", "1"), parties, session, address, insecure=True)).train()
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2-block GPT-2 on the CPU, fewer steps")
    p.add_argument("--reviews", type=int, default=None, help="reviews per epoch (default: 6400, quick 320)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--every", type=int, default=None, help="steps between syncs of the every-N row (50, quick 5)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 20, quick 3)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--deepspeed", default=None, help="a fedfleet preset (zero0..zero3) or a JSON config")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args()
    quick = args.quick
    args.reviews = args.reviews or (320 if quick else 6400)
    args.every = args.every or (5 if quick else 50)
    args.repeats = args.repeats or (2 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if quick else 20)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(address: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the arbiter did not listen on {address} (exit code {process.poll()})")


def build_model(args: argparse.Namespace, tokenizer: Any) -> Any:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    size = {"n_layer": 2, "n_embd": 128, "n_head": 4} if args.quick else {}  # the rest: GPT-2 124M's defaults
    config = GPT2Config(
        n_positions=max(args.seq_len, 128) if args.quick else 1024,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        **size,
    )
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(config)


class StepClock(TrainerCallback):
    """Times every optimizer step's end; installed after the sync callback, so syncs are inside."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done, not only queued
        self.ends.append(time.perf_counter())


def train_once(args: argparse.Namespace, side: str, data: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from fedfleet.hf import FedArguments, FedAvgClient, create_context
    from fedfleet.hf.ds_config import load_deepspeed_config

    model = build_model(args, tokenizer)
    training_args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=5e-5,
        logging_steps=10_000,  # no logging inside the timed steps, on either side
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        deepspeed=load_deepspeed_config(args.deepspeed) if args.deepspeed else None,
    )
    clock = StepClock()
    arbiter = None
    if side == "plain":
        trainer = Trainer(model=model, args=training_args, train_dataset=data)
    else:
        address, session = f"127.0.0.1:{free_port()}", f"bench-{side}-{time.monotonic_ns()}"
        arbiter = subprocess.Popen([sys.executable, "-c", ARBITER, address, session])
        wait_listening(address, arbiter)  # else the party's first dials fail and it backs off
        fed_args = FedArguments("epoch", 1) if side == "party-epoch" else FedArguments("step", args.every)
        parties = [("guest", "1"), ("arbiter", "1")]
        ctx = create_context(("guest", "1"), parties, session, address, insecure=True)
        trainer = FedAvgClient(ctx=ctx, model=model, fed_args=fed_args, training_args=training_args, train_set=data)
    trainer.add_callback(clock)  # after the sync callback: a step's time includes its sync
    try:
        trainer.train()
    finally:
        if arbiter is not None:
            try:
                arbiter.wait(timeout=60)
            except subprocess.TimeoutExpired:
                arbiter.kill()
    ends = clock.ends[args.warmup - 1 :] if args.warmup > 0 else clock.ends
    samples = (len(ends) - 1) * args.batch_size * training_args.world_size
    fed = getattr(trainer, "fed_sync", None)
    weights = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters()}
    span = ends[-1] - ends[0]
    return {
        "samples_per_s": samples / span,
        # the share of the timed span spent in syncs: the overhead measured from inside one run, which the
        # run-to-run noise of the throughputs (several % on a shared CPU) does not blur
        "sync_share": (fed.sync_seconds if fed else 0.0) / span,
        "steps": len(clock.ends),
        "syncs": fed.syncs if fed else 0,
        "sync_s": round(fed.sync_seconds, 3) if fed else 0.0,
        "weights": weights,
    }


def main() -> int:
    args = parse()
    if args.deepspeed:  # one process without a launcher: a world of one
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer, write_reviews_csv

    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-"))
    tokenizer = gpt2_tokenizer()
    csv = write_reviews_csv(work, limit=args.reviews, seed=0, balanced=False)  # throughput: balance is moot
    data = TokenizerDataset(tokenizer, max_length=args.seq_len, padding="max_length").load(csv)
    sides = ["plain", "party-epoch", f"party-every-{args.every}"]
    params = sum(p.numel() for p in build_model(args, tokenizer).parameters())
    log(f"GPT-2 {params / 1e6:.1f}M params, {len(data)} reviews x {args.epochs} epochs, batch {args.batch_size}")
    for side in sides:  # warm-up: kernels, allocator, the first arbiter start
        train_once(args, side, data, tokenizer, work / f"warm-{side}")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in sides:
            result = train_once(args, side, data, tokenizer, work / f"{side}-{r}")
            runs[side].append(result)
            log(
                f"repeat {r + 1} {side:>16}: {result['samples_per_s']:8.1f} samples/s, {result['syncs']} syncs, "
                f"{result['sync_s']:.2f} s in syncs"
            )
    plain = median(r["samples_per_s"] for r in runs["plain"])
    rows = {}
    for side in sides:
        rate = median(r["samples_per_s"] for r in runs[side])
        last = runs[side][-1]
        diff = max((last["weights"][n] - runs["plain"][-1]["weights"][n]).abs().max().item() for n in last["weights"])
        share = median(r["sync_share"] for r in runs[side])
        rows[side] = {
            "samples_per_s": round(rate, 2),
            "vs_plain": round(rate / plain, 4),
            "sync_share": round(share, 4),
            "syncs": last["syncs"],
            "sync_s": last["sync_s"],
            "max_abs_diff_vs_plain": diff,
        }
        log(
            f"{side:>16}: {rate:8.1f} samples/s = {rate / plain:.3f} x plain; {last['syncs']} syncs "
            f"({last['sync_s']:.2f} s, {share:.1%} of the timed steps); final weights within {diff:.2e} of plain's"
        )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.machine()} CPU"
    emit(
        {
            "benchmark": "hf_trainer_overhead",
            "quick": args.quick,
            "device": device,
            "torch": torch.__version__,
            "params_m": round(params / 1e6, 1),
            "bf16": args.bf16,
            "deepspeed": args.deepspeed,
            "target_party_epoch_vs_plain": 0.97,
            "rows": rows,
            "load_avg_1min": {"start": load_start, "end": load_average()},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
