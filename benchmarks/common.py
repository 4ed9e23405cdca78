"""Shared pieces of the simulation benchmarks: workload W, its data and model, the cohort schedule, the
per-client batch order, a hand-written local-training step, and timing helpers.

Workload W is pfl-research's CIFAR10 cross-device benchmark scaled for a 2-core CPU: 200 clients x 50
images (3x32x32, random pixels and labels), cohort 10, 20 rounds, 1 local epoch at batch 10 (5 SGD
steps, lr 0.1), pfl-research's simple CNN, FedAvg weighted by examples.

Workload S (``SmallWorkload``) is the cross-device shape: a small model, 2,000 clients, a cohort of 100.

Everything here is a pure function of the workload's seed, so a second process (the Flower side, in its
own venv) rebuilds bit-identical data, initial weights, cohorts and batch orders.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fedfleet.client.torch_trainer import batch_indices
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.seeding import SELECT
from fedfleet.data.federated import FederatedDataset
from fedfleet.data.partition import partition
from fedfleet.models import build_model
from fedfleet.runtime.sim import client_seed
from fedfleet.select import UniformSelector

T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    clients: int = 200
    per_client: int = 50  # examples per client
    cohort: int = 10
    rounds: int = 20
    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.1
    seed: int = 0
    num_classes: int = 10
    shape: tuple[int, int, int] = (3, 32, 32)

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def workload(quick: bool, rounds: int | None = None) -> Workload:
    """W, or W with 5 rounds in ``--quick`` mode; ``rounds`` overrides both."""
    return Workload(rounds=rounds if rounds is not None else (5 if quick else 20))


# -- data and model --------------------------------------------------------------------------------
def make_data(w: Workload) -> tuple[Tensor, Tensor]:
    """Random images in [0, 1) and random labels; (N, 3, 32, 32) float32 and (N,) int64."""
    gen = torch.Generator().manual_seed(w.seed)
    n = w.clients * w.per_client
    x = torch.rand((n, *w.shape), generator=gen)
    y = torch.randint(0, w.num_classes, (n,), generator=gen)
    return x, y


def make_federation(w: Workload) -> FederatedDataset:
    """W's federation: the random data dealt out by fedfleet's iid partition (seeded)."""
    x, y = make_data(w)
    parts = partition("iid", y.numpy(), w.clients, w.seed)
    return FederatedDataset.from_partition(x, y, parts, w.num_classes)


def client_bounds(fed: FederatedDataset) -> list[tuple[int, int]]:
    """(start, end) row range of each client in ``fed.x`` / ``fed.y``."""
    return list(itertools.pairwise(int(v) for v in fed.offsets))


def make_model(w: Workload) -> nn.Module:
    """pfl-research's simple CNN (1.2M params) with W's seeded initial weights, the same in every process."""
    torch.manual_seed(w.seed)
    return build_model("simple_cnn", w.shape, w.num_classes)


# -- workload S: the cross-device shape (small model, many clients, a large cohort) --------------------
@dataclass(frozen=True)
class SmallWorkload:
    """Workload S: 2,000 clients x 64 examples of 784 random features (10 classes), cohort 100, 20 rounds,
    1 local epoch at batch 16 (4 SGD steps, lr 0.1), FedAvg weighted by examples. ``model`` picks the row:
    ``mlp`` (784-100-10, 79.5K params: S itself), ``logreg`` (784-10) or ``femnist_cnn`` (28x28 inputs,
    62 classes, the simple CNN: the FEMNIST-like third row)."""

    model: str = "mlp"
    clients: int = 2000
    per_client: int = 64
    cohort: int = 100
    rounds: int = 20
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    seed: int = 0
    num_classes: int = 10
    shape: tuple[int, ...] = (784,)

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SMALL_MODELS = ("mlp", "logreg", "femnist_cnn")
SWEEP_MODELS = (*SMALL_MODELS, "mlp_wide")  # mlp_wide: 784-1000-10 (795K params), for the vectorize: auto sweep


def small_workload(model: str = "mlp", **changes: Any) -> SmallWorkload:
    """S's row for ``model``; the FEMNIST-like row has 28x28 single-channel inputs and 62 classes."""
    if model not in SWEEP_MODELS:
        raise ValueError(f"model must be one of {SWEEP_MODELS}, got {model!r}")
    shape = {"femnist_cnn": {"shape": (1, 28, 28), "num_classes": 62}}.get(model, {})
    return dataclasses.replace(SmallWorkload(model=model, **shape), **changes)


def make_small_federation(w: SmallWorkload) -> FederatedDataset:
    """Random features in [0, 1) and random labels, ``w.per_client`` consecutive rows per client."""
    gen = torch.Generator().manual_seed(w.seed)
    n = w.clients * w.per_client
    x = torch.rand((n, *w.shape), generator=gen)
    y = torch.randint(0, w.num_classes, (n,), generator=gen)
    offsets = torch.arange(0, n + 1, w.per_client, dtype=torch.int64)
    return FederatedDataset(x, y, offsets, w.num_classes)


def make_small_model(w: SmallWorkload) -> nn.Module:
    """S's model with seeded initial weights, the same in every process."""
    torch.manual_seed(w.seed)
    if w.model in ("mlp", "mlp_wide"):
        return build_model("mlp", w.shape, w.num_classes, hidden=[100 if w.model == "mlp" else 1000])
    if w.model == "logreg":
        return build_model("logistic_regression", w.shape, w.num_classes)
    return build_model("simple_cnn", w.shape, w.num_classes)


# -- the schedule both sides follow -----------------------------------------------------------------
def cohorts(w: Workload) -> list[list[int]]:
    """The clients of every round, exactly as fedfleet's RoundLoop selects them."""
    sel = UniformSelector()
    return [[int(c) for c in sel.select(w.clients, w.cohort, r, w.seed + SELECT)] for r in range(w.rounds)]


def round_config(w: Workload, rnd: int) -> FitConfig:
    """The FitConfig the RoundLoop hands the runtime in round ``rnd`` (before the per-client seed)."""
    return dataclasses.replace(w.fit_config(), round=rnd, seed=w.seed)


def client_batches(w: Workload, rnd: int, cid: int, n: int) -> list[Tensor]:
    """Client ``cid``'s batch indices (0-based within its own data) in round ``rnd``: the same seed
    (``client_seed``) and generator as fedfleet's trainer."""
    config = round_config(w, rnd)
    gen = torch.Generator().manual_seed(client_seed(config, cid))
    return list(batch_indices(n, config, gen, torch.device("cpu")))


# -- hand-written local training (the plain-PyTorch baseline and the Flower client) -------------------
def local_sgd(model: nn.Module, x: Tensor, y: Tensor, batches: Iterable[Tensor], lr: float) -> int:
    """Plain PyTorch: torch.optim.SGD over the given batches; returns the number of examples seen."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy
    seen = 0
    for idx in batches:
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
        seen += len(idx)
    return seen


# -- fedfleet's side ---------------------------------------------------------------------------------
def run_fedfleet(w: Workload, fed: FederatedDataset, vectorize: str) -> tuple[dict[str, Tensor], float, list[float]]:
    """fedfleet end to end from a freshly built model: trainer, runtime, RoundLoop, ``w.rounds`` rounds.

    Returns the final global params, the wall seconds, and each round's wall seconds (the loop's own).
    """
    from fedfleet.client import TorchTrainer
    from fedfleet.core.loop import LoopConfig, RoundLoop
    from fedfleet.runtime.sim import make_runtime
    from fedfleet.strategy import build_strategy

    model = make_model(w)

    def go() -> tuple[dict[str, Tensor], list[float]]:
        trainer = TorchTrainer(model, optimizer="sgd")
        runtime = make_runtime(trainer, fed, None, vectorize)
        loop = RoundLoop(
            build_strategy("fedavg"),
            runtime,
            UniformSelector(),
            trainer.params.clone(),
            w.fit_config(),
            LoopConfig(rounds=w.rounds, cohort=w.cohort, seed=w.seed, eval_every=0),
        )
        history = loop.run()
        final = {k: v.clone() for k, v in loop.global_params.tensors().items()}
        return final, [r.metrics["wall_s"] for r in history]

    (final, walls), seconds = timed(go)
    return final, seconds, walls


# -- timing and reporting -----------------------------------------------------------------------------
def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    if list(a) != list(b):
        raise ValueError(f"param names differ: {list(a)} vs {list(b)}")
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def load_average() -> float:
    """The 1-minute load average: other processes on the machine distort timings; record it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def log(*args: object) -> None:
    """Progress goes to stderr, so the JSON result is the last line of stdout."""
    print(*args, file=sys.stderr, flush=True)


def environment(args: Any, w: Workload, load_start: float) -> dict[str, Any]:
    """What a result needs beside its numbers to be compared later: settings, machine, load, workload."""
    return {
        "repeats": args.repeats,
        "threads": args.threads,
        "load_avg_1min": {"start": load_start, "end": load_average()},
        "quick": args.quick,
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "workload": w.as_dict(),
    }


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def plain_fedavg(w: Any, fed: Any, model: nn.Module) -> tuple[dict[str, Tensor], float]:
    """Workload ``w``'s federated training as a hand-written loop over ``model``'s parameter tensors, timed: per
    client, load the global params, plain SGD (``local_sgd``), fold n_k (w_k - w); the reference every benchmark's
    fedfleet side must equal."""

    def go() -> dict[str, Tensor]:
        names, params = zip(*model.named_parameters(), strict=True)
        glob = [p.detach().clone() for p in params]
        acc = [torch.zeros_like(p) for p in params]
        bounds = client_bounds(fed)
        for rnd, clients in enumerate(cohorts(w)):
            for a in acc:
                a.zero_()
            total = 0
            for cid in clients:
                lo, hi = bounds[cid]
                with torch.no_grad():
                    for p, g in zip(params, glob, strict=True):
                        p.copy_(g)
                local_sgd(model, fed.x[lo:hi], fed.y[lo:hi], client_batches(w, rnd, cid, hi - lo), w.lr)
                with torch.no_grad():
                    for a, p, g in zip(acc, params, glob, strict=True):
                        a.add_(p - g, alpha=float(hi - lo))  # FedAvg weighs a client by its examples
                total += hi - lo
            for g, a in zip(glob, acc, strict=True):
                g.add_(a.mul_(1.0 / total))
        return dict(zip(names, glob, strict=True))

    return timed(go)
