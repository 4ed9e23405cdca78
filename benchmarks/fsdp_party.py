"""An FSDP party beside the same FSDP training without federation: steps/s with a sync every epoch (issue 17).

Both sides train a tiny LLaMA (built from ``LlamaConfig``, random weights) on 2 CPU ranks (gloo) with FSDP2
``FULL_SHARD`` (``fully_shard`` per decoder layer, then the root), the precision ``"auto"`` picks on this machine,
AdamW, a ``DistributedSampler``, the same data, each from a fresh model. The plain side is the loop a user writes
with torch alone; the federated side is an ``FSDPParty`` in a session of its own with a ``SyncArbiter`` over gRPC
on loopback (in the launching process), syncing all its params at the end of every epoch.

``--mode interleaved`` (the default): the same two rank processes train both sides step by step in turns (who
goes first alternates every step), each step timed apart; the party's step is ``fit``'s (its hooks ``count`` and
``end_step``, the sync inside the step that is due). On a shared machine this is what keeps the other load off
the ratio: whole runs of one side and then the other moved it between 0.72 and 1.45 here from one repeat to the
next. ``--mode whole``: whole runs of ``FSDPParty.fit`` and of the plain loop, in turns.

The figure is steps/s over the training (the party's joining of the session excluded, reported apart as
``start_s``); the ratio is party / plain (target >= 0.95), the median over repeats; ``sync_share`` is the
party's time inside its syncs (gather + gRPC + the arbiter's fold + scatter).

    python benchmarks/fsdp_party.py                  # 5 repeats, 3 epochs of 100 steps, interleaved
    python benchmarks/fsdp_party.py --quick          # 2 repeats, 2 epochs of 40 steps (< 2 min on 2 cores)
    python benchmarks/fsdp_party.py --mode whole     # whole runs in turns
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


# -- the workload ------------------------------------------------------------------------------------------
def tiny_llama(a: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=int(a.hidden * 8 / 3) // 8 * 8,  # LLaMA's SwiGLU ratio
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 32,
        num_key_value_heads=max(1, a.hidden // 64),
        max_position_embeddings=a.seq,
    )
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int, seq: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def plain_setup(a: argparse.Namespace, data: Tokens, dtype: torch.dtype) -> tuple:
    """The training without federation, as a user writes it with torch alone: model, optimizer, sampler, loader."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils.data import DataLoader, DistributedSampler

    model = tiny_llama(a)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    policy = policy or MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = DistributedSampler(data, num_replicas=dist.get_world_size(), rank=dist.get_rank(), seed=0)
    loader = DataLoader(data, batch_size=a.batch, sampler=sampler, drop_last=True)
    model.train()
    return model, opt, sampler, loader


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


def plain_fsdp(a: argparse.Namespace, data: Tokens, dtype: torch.dtype) -> float:
    """The whole training without federation; returns its seconds."""
    import torch.distributed as dist

    model, opt, sampler, loader = plain_setup(a, data, dtype)
    dist.barrier()
    started = time.perf_counter()
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            plain_step(model, opt, batch)
    dist.barrier()
    return time.perf_counter() - started


def make_party(a: argparse.Namespace, address: str, session: str):
    from fedfleet.hpc.fsdp import FSDPConfig
    from fedfleet.hpc.fsdp_party import FSDPParty
    from fedfleet.sync import FedArguments, create_context

    parties = [("guest", "9999"), ("arbiter", "10000")]
    ctx = create_context(("guest", "9999"), parties, session, address, insecure=True)
    return FSDPParty(ctx, tiny_llama(a), FedArguments("epoch", 1), FSDPConfig("FULL_SHARD", precision="auto"))


def party_step(party, opt: torch.optim.Optimizer, batch: dict) -> None:
    """One step as ``FSDPParty.fit`` takes it (one micro-batch), with the sync when one is due."""
    party.model.set_requires_gradient_sync(True)
    loss = party.model(**batch).loss
    loss.backward()
    party.count(batch["input_ids"].shape[0], loss)
    opt.step()
    opt.zero_grad()
    party.end_step()


def interleaved(a: argparse.Namespace, data: Tokens, dtype: torch.dtype, address: str, session: str) -> dict:
    """Both trainings in the same processes, step by step in turns (who goes first alternates every step), so
    the machine's other load falls on both alike; each side's steps are timed apart."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    model, opt, sampler, loader = plain_setup(a, data, dtype)
    party = make_party(a, address, session)
    party_opt = torch.optim.AdamW(party.model.parameters(), lr=1e-4)
    party_sampler = DistributedSampler(data, num_replicas=dist.get_world_size(), rank=dist.get_rank(), seed=0)
    party_loader = DataLoader(data, batch_size=a.batch, sampler=party_sampler, drop_last=True)
    party.model.train()
    party.begin(a.epochs * len(party_loader), len(party_loader))
    plain_s = party_s = 0.0
    step = 0
    try:
        for epoch in range(a.epochs):
            sampler.set_epoch(epoch)
            party_sampler.set_epoch(epoch)
            for batch, party_batch in zip(loader, party_loader, strict=True):
                for side in ("plain", "party") if step % 2 == 0 else ("party", "plain"):
                    started = time.perf_counter()
                    if side == "plain":
                        plain_step(model, opt, batch)
                        plain_s += time.perf_counter() - started
                    else:
                        party_step(party, party_opt, party_batch)
                        party_s += time.perf_counter() - started
                step += 1
    finally:
        party.close()
    syncs = [r.seconds for r in party.history]
    return {
        "plain_s": plain_s,
        "seconds": party_s,
        "start_s": party.start_seconds,
        "syncs": len(syncs),
        "sync_s": syncs,
    }


def federated_fsdp(a: argparse.Namespace, data: Tokens, address: str, session: str) -> dict:
    """The whole training as ``FSDPParty.fit`` syncing every epoch; its seconds without the session's start."""
    import torch.distributed as dist

    party = make_party(a, address, session)
    dist.barrier()
    started = time.perf_counter()
    party.fit(data, epochs=a.epochs, batch_size=a.batch, lr=1e-4)
    dist.barrier()
    seconds = time.perf_counter() - started - party.start_seconds
    syncs = [r.seconds for r in party.history]
    return {"seconds": seconds, "start_s": party.start_seconds, "syncs": len(syncs), "sync_s": syncs}


def rank_main(a: argparse.Namespace) -> None:
    """One of the two ranks: both sides, ``repeats`` times, in turns."""
    import torch.distributed as dist

    from fedfleet.hpc.precision import compute_dtype

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dtype = compute_dtype("auto", "cpu")
    data = Tokens(a.steps_per_epoch * a.batch * WORLD, a.vocab, a.seq)
    steps = a.epochs * a.steps_per_epoch
    warm = argparse.Namespace(**{**vars(a), "epochs": 1})
    plain_fsdp(warm, Tokens(4 * a.batch * WORLD, a.vocab, a.seq), dtype)  # untimed: first allocations, thread pools
    runs = []
    for k, address in enumerate(a.addresses.split(",")):
        result: dict = {}
        if a.mode == "interleaved":
            result.update(interleaved(a, data, dtype, address, f"bench-{k}"))
        else:  # whole runs, in turns (the side that goes first alternates each repeat)
            for side in ("plain", "party") if k % 2 == 0 else ("party", "plain"):
                if side == "plain":
                    result["plain_s"] = plain_fsdp(a, data, dtype)
                else:
                    result.update(federated_fsdp(a, data, address, f"bench-{k}"))
        result["steps"] = steps
        result["plain_steps_s"] = steps / result["plain_s"]
        result["party_steps_s"] = steps / result["seconds"]
        result["ratio"] = result["party_steps_s"] / result["plain_steps_s"]
        result["sync_share"] = sum(result["sync_s"]) / result["seconds"]
        result["load"] = load_average()
        runs.append(result)
        if dist.get_rank() == 0:
            syncs = ", ".join(f"{s:.3f}" for s in result["sync_s"])
            log(
                f"repeat {k}: plain {result['plain_steps_s']:.2f} steps/s, party {result['party_steps_s']:.2f} "
                f"steps/s: ratio {result['ratio']:.3f}; {result['sync_share']:.2%} in syncs ({syncs} s), "
                f"start {result['start_s']:.2f} s, load {result['load']}"
            )
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in tiny_llama(a).parameters())
        Path(a.result).write_text(json.dumps({"runs": runs, "params": params, "dtype": str(dtype), "steps": steps}))
    dist.destroy_process_group()


# -- the launcher ------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--mode", choices=("interleaved", "whole"), default="interleaved")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--addresses", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.epochs = a.epochs or (2 if a.quick else 3)
    a.steps_per_epoch = a.steps_per_epoch or (40 if a.quick else 100)
    if a.rank:
        rank_main(a)
        return

    from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig

    load_start, begun = load_average(), time.perf_counter()
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(a.repeats)]
    failures: list[BaseException] = []
    for k, address in enumerate(addresses):  # one session per repeat, each waiting for its party
        arbiter = SyncArbiter(SyncSessionConfig(session=f"bench-{k}", parties=["guest-9999"], address=address,
                                                certs=None, wait_timeout=900))  # fmt: skip

        def serve(arbiter: SyncArbiter = arbiter) -> None:
            try:
                arbiter.serve()
            except BaseException as exc:
                failures.append(exc)

        threading.Thread(target=serve, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        port = str(free_port())
        args = [x for x in sys.argv[1:] if x != "--quick"]
        args += ["--repeats", str(a.repeats), "--epochs", str(a.epochs), "--steps-per-epoch", str(a.steps_per_epoch)]
        procs = []
        for rank in range(WORLD):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            env.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
            cmd = [sys.executable, __file__, "--rank", "--addresses", ",".join(addresses), "--result", str(result_path)]
            procs.append(subprocess.Popen([*cmd, *args], env=env, cwd=ROOT))
        codes = [proc.wait(timeout=3600) for proc in procs]
        if any(codes) or failures:
            raise SystemExit(f"a rank failed (exit codes {codes}) or an arbiter did: {failures}")
        ranks = json.loads(result_path.read_text())
    runs = ranks["runs"]
    ratios = sorted(r["ratio"] for r in runs)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1 :][:2]) / 2
    sync_s = [s for r in runs for s in r["sync_s"]]
    summary = {
        "benchmark": "fsdp_party",
        "quick": a.quick,
        "mode": a.mode,
        "ranks": WORLD,
        "params": ranks["params"],
        "dtype": ranks["dtype"],
        "shape": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "seq": a.seq, "batch_per_rank": a.batch},
        "epochs": a.epochs,
        "steps_per_epoch": a.steps_per_epoch,
        "repeats": a.repeats,
        "plain_steps_s": [round(r["plain_steps_s"], 3) for r in runs],
        "party_steps_s": [round(r["party_steps_s"], 3) for r in runs],
        "ratios": [round(r["ratio"], 4) for r in runs],
        "ratio_median": round(median, 4),
        "target": 0.95,
        "met": median >= 0.95,
        "sync_s_mean": round(sum(sync_s) / len(sync_s), 4),
        "sync_share": [round(r["sync_share"], 4) for r in runs],
        "steps_s_without_syncs": [round(r["steps"] / (r["seconds"] - sum(r["sync_s"])), 3) for r in runs],
        "start_s": [round(r["start_s"], 3) for r in runs],
        "load_start": load_start,
        "load_end": load_average(),
        "wall_s": round(time.perf_counter() - begun, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
