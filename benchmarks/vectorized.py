"""Cohort-vectorised vs sequential simulation, side by side, on pfl-research's CIFAR10 cross-device shape.

Full shape (for a GPU): 1,000 clients x 50 images 3x32x32, cohort 50, 1,500 rounds, 1 local epoch at
batch 10, lr 0.1, the simple CNN, FedAvg. Targets on one H100: the vectorised path under 1 minute and >= 10x
faster than the sequential path. Both paths start from the same model and must end at the same model
(max abs difference printed). The sequential path is timed on a slice of the rounds and extrapolated
(the printout says so) because its full run is the slow thing being compared.

    python benchmarks/vectorized.py --device cuda          # full shape
    python benchmarks/vectorized.py --quick                # CPU-sized: 200 clients, cohort 10, 10 rounds
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedfleet.client import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.data import FederatedDataset, load_dataset, partition
from fedfleet.models import build_model
from fedfleet.runtime.sim import SequentialRuntime, VectorizedRuntime
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(runtime_cls, federation, device, rounds: int, cohort: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("simple_cnn", (3, 32, 32), 10)
    trainer = TorchTrainer(model, device=device)
    loop = RoundLoop(
        build_strategy("fedavg"),
        runtime_cls(trainer, federation),
        UniformSelector(),
        trainer.params.clone(),
        FitConfig(epochs=1, batch_size=10, lr=0.1),
        LoopConfig(rounds=rounds, cohort=cohort, seed=0, eval_every=0),
    )
    start = {**loop.snapshot(), "global": loop.global_params.clone()}
    loop.run_round(0)  # warm-up: allocator, kernels, vmap tracing
    loop.restore(start)
    sync(device)
    t = time.perf_counter()
    loop.run()
    sync(device)
    return time.perf_counter() - t, loop.global_params.buffers[torch.float32].cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sequential-rounds", type=int, default=None, help="rounds to time the sequential path on")
    args = parser.parse_args()
    device = torch.device(args.device)
    clients, cohort, rounds = (200, 10, 10) if args.quick else (1000, 50, 1500)
    seq_rounds = args.sequential_rounds or (rounds if args.quick else 100)

    data = load_dataset("synthetic", shape=(3, 32, 32), num_samples=clients * 50, num_classes=10, seed=0)
    parts = partition("iid", data.y.numpy(), clients, seed=0)
    federation = FederatedDataset.from_partition(data.x, data.y, parts, 10).to(device)

    t_vec, w_vec = run(VectorizedRuntime, federation, device, rounds, cohort)
    t_seq_part, w_seq = run(SequentialRuntime, federation, device, seq_rounds, cohort)
    t_seq = t_seq_part * rounds / seq_rounds
    # the same trajectory: compare on the rounds both ran
    w_vec_part = w_vec if seq_rounds == rounds else run(VectorizedRuntime, federation, device, seq_rounds, cohort)[1]
    diff = float((w_vec_part - w_seq).abs().max())
    print(f"device {device}: {clients} clients, cohort {cohort}, {rounds} rounds")
    print(f"vectorised : {t_vec:8.2f} s")
    extrapolated = "" if seq_rounds == rounds else f" (timed on {seq_rounds} rounds, extrapolated)"
    print(f"sequential : {t_seq:8.2f} s{extrapolated}")
    print(f"speed-up   : {t_seq / t_vec:8.2f}x; max |w_vec - w_seq| = {diff:.2e}")
    print(
        json.dumps(
            {
                "benchmark": "vectorized",
                "device": str(device),
                "clients": clients,
                "cohort": cohort,
                "rounds": rounds,
                "vectorized_s": round(t_vec, 3),
                "sequential_s": round(t_seq, 3),
                "speedup": round(t_seq / t_vec, 3),
                "max_abs_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
