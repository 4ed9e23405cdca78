"""What FedLightningCallback adds to a Lightning run: the same training with and without it, side by side.

One process, one party, so nothing waits for another party's training: what is measured is the sync
machinery itself. Workload: ``DigitsMLP`` from ``examples/lightning/digits_party.py`` (64 -> hidden -> 10)
on a share of scikit-learn's digits, Adam, batch 32, the same seed and batch order on every side. Rows:

- ``plain``: ``L.Trainer.fit`` alone (no logger, no checkpoint, no progress bar);
- ``local``: + ``FedLightningCallback`` on a ``LocalFederation(1)`` (in memory), syncing every step: the cost
  of the hooks, the example counting and the in-place load of the mean, with no transport;
- ``grpc``: + the callback over plaintext gRPC on loopback to a model-less arbiter (``FedAvgServer``) in a
  thread of this process, syncing every ``--grpc-every`` steps: a sync's real round trip.

Each side is warmed up once, then the sides run interleaved ``--repeats`` times and the medians are compared.
The ms-per-sync figures are (side - plain) / syncs, which a loaded machine's noise can swamp; the
``sync_inside_ms`` figures are timed around each exchange by the callback itself (gather, the round trip or
the in-memory mean, broadcast, scatter) and are the robust ones. The final model of ``local`` must equal ``plain``'s (a
federation of one returns the party's own params: sum * 1/weight, exact for power-of-two weights), which
shows the callback changes nothing in the training itself; ``grpc`` goes through the delta form and is
compared with a tolerance.

    python benchmarks/lightning_overhead.py            # hidden 1024, 3 epochs, 5 repeats
    python benchmarks/lightning_overhead.py --quick    # hidden 256, 2 epochs, 3 repeats (about a minute)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from common import emit, load_average, log, median, set_threads, timed

EXAMPLE = Path(__file__).parents[1] / "examples" / "lightning" / "digits_party.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("digits_party_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fit(ex: Any, args: argparse.Namespace, callbacks: list) -> tuple[dict[str, torch.Tensor], int]:
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    module = ex.DigitsMLP(hidden=args.hidden, seed=0)
    trainer.fit(module, ex.DigitsData(0, 1, 32, limit=args.examples, seed=0))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, trainer.global_step


Side = tuple[dict[str, torch.Tensor], int, float]  # final model, syncs, median seconds inside one sync


def side_plain(ex: Any, args: argparse.Namespace) -> Side:
    model, _ = fit(ex, args, [])
    return model, 0, 0.0


def side_local(ex: Any, args: argparse.Namespace) -> Side:
    from fedfleet.lightning import FedArguments, FedLightningCallback, LocalFederation

    fed = FedLightningCallback(LocalFederation(1).context(0), FedArguments("step", 1))
    model, _ = fit(ex, args, [fed])
    return model, fed.syncs, median(r.sync_seconds for r in fed.history)


def side_grpc(ex: Any, args: argparse.Namespace) -> Side:
    from fedfleet.lightning import FedArguments, FedAvgServer, FedLightningCallback, create_context

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.grpc_jobs import free_port

    parties = [("guest", "1"), ("arbiter", "2")]
    address = f"127.0.0.1:{free_port()}"
    server = FedAvgServer(create_context(("arbiter", "2"), parties, "bench", address, insecure=True))
    arbiter = threading.Thread(target=server.train, daemon=True)
    arbiter.start()
    ctx = create_context(("guest", "1"), parties, "bench", address, insecure=True)
    fed = FedLightningCallback(ctx, FedArguments("step", args.grpc_every))
    model, _ = fit(ex, args, [fed])
    arbiter.join(30)
    return model, fed.syncs, median(r.sync_seconds for r in fed.history)


SIDES = {"plain": side_plain, "local": side_local, "grpc": side_grpc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--examples", type=int, default=1024, help="the party's training examples (32 per step)")
    p.add_argument("--grpc-every", type=int, default=4, help="steps between syncs on the gRPC side")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.hidden = args.hidden or (256 if args.quick else 1024)
    args.epochs = args.epochs or (2 if args.quick else 3)
    set_threads(args.threads)
    logging.disable(logging.WARNING)  # Lightning's banners and the parties' INFO lines: not timings
    warnings.filterwarnings("ignore")
    load_start = load_average()
    ex = load_example()

    times: dict[str, list[float]] = {name: [] for name in SIDES}
    results: dict[str, Side] = {}
    for name, side in SIDES.items():  # warm-up: imports, first-call costs
        results[name] = side(ex, args)
    for r in range(args.repeats):
        for name, side in SIDES.items():
            results[name], seconds = timed(lambda side=side: side(ex, args))
            times[name].append(seconds)
        log(f"repeat {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))

    plain = median(times["plain"])
    model, _, _ = results["plain"]
    params = sum(v.numel() for v in model.values())
    out: dict[str, Any] = {
        "benchmark": "lightning_overhead",
        "params": params,
        "plain_s": round(plain, 3),
    }
    for name in ("local", "grpc"):
        other, syncs, inside = results[name]
        seconds = median(times[name])
        diff = max(float((other[k] - model[k]).abs().max()) for k in model)
        out[f"{name}_s"] = round(seconds, 3)
        out[f"{name}_ratio"] = round(seconds / plain, 3)
        out[f"{name}_syncs"] = syncs
        out[f"{name}_ms_per_sync"] = round(1000 * (seconds - plain) / syncs, 2)
        out[f"{name}_sync_inside_ms"] = round(1000 * inside, 3)  # measured around the exchange itself
        out[f"{name}_max_abs_diff"] = diff
    out.update(
        repeats=args.repeats,
        hidden=args.hidden,
        epochs=args.epochs,
        examples=args.examples,
        threads=args.threads,
        quick=args.quick,
        torch=torch.__version__,
        load_avg_1min={"start": load_start, "end": load_average()},
    )
    if out["local_max_abs_diff"] != 0.0:
        log("WARNING: the federation of one changed the model; the callback is not transparent")
    emit(out)


if __name__ == "__main__":
    main()
