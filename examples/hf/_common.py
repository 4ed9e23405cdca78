"""What the scripts in examples/hf share: a deployed session's options and parties, the arbiter's role, the
Trainer settings every party uses, and each data owner's share of the real review data (in reality every party
brings its own CSV)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROLES = ("guest", "host", "arbiter")


def add_session_args(p: argparse.ArgumentParser, session: str, *, required: bool = True) -> None:
    """--role, --party-id and where the session is (FATE-LLM's parties: one guest, hosts, an arbiter)."""
    g = p.add_argument_group("deployed session (gRPC, one process per role)")
    alone = "" if required else " (without it, every role runs in this one process)"
    g.add_argument("--role", choices=ROLES, required=required, help=f"this process's role in the session{alone}")
    g.add_argument("--party-id", required=required, help="this party's id (guest 9999, host 10000, arbiter 10000)")
    g.add_argument("--guest", default="9999", help="the guest's party id")
    g.add_argument("--hosts", default="10000", help="the hosts' party ids, comma-separated")
    g.add_argument("--arbiter-id", default="10000", help="the arbiter's party id")
    g.add_argument("--session", default=session, help="the federation session id (the same everywhere)")
    g.add_argument("--address", default="127.0.0.1:50051", help="where the arbiter listens / parties dial")
    g.add_argument("--certs", default="certs", help="folder from `fedfleet certs` (ca.crt, <role>-<id>.crt/.key)")
    g.add_argument("--insecure", action="store_true", help="plaintext, for a trusted network only")


def parties(args: argparse.Namespace) -> list[tuple[str, str]]:
    hosts = [("host", h) for h in args.hosts.split(",") if h]
    return [("guest", args.guest), *hosts, ("arbiter", args.arbiter_id)]


def data_owners(everyone: list[tuple[str, str]]) -> list[str]:
    """The data owners' names in session order: share i of the data is theirs."""
    return [f"{r}-{i}" for r, i in everyone if r != "arbiter"]


def context(args: argparse.Namespace) -> Any:
    from fedfleet.hf import create_context

    return create_context(
        (args.role, args.party_id), parties(args), args.session, args.address, certs=args.certs, insecure=args.insecure
    )


def serve(ctx: Any) -> int:
    """The arbiter's whole job: fold the parties' updates each round; prints one JSON line."""
    from fedfleet.hf import FedAvgServer

    history = FedAvgServer(ctx).train()
    print(json.dumps({"rounds": len(history), "train_loss": [r.metrics.get("train_loss") for r in history]}))
    return 0


def leave_ranks() -> None:
    """Closes the process group the Trainer started under a launcher, and frees what holds it, before the exit: a
    gloo group left to the interpreter's teardown can abort its rank (SIGABRT) after the work is done."""
    if "torch.distributed" in sys.modules:  # not imported: no group (and no torch import for the arbiter)
        from fedfleet.sync import end_process_group

        end_process_group()


def training_arguments(args: argparse.Namespace, output_dir: Path, **extra: Any) -> Any:
    """The Trainer settings from the scripts' common options (``epochs``, ``batch_size``, ``lr``, ``log_every``):
    no checkpoints, no reporting, the GPU when there is one; ``extra`` adds or overrides any other."""
    import torch
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "logging_steps": args.log_every,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
    }
    return TrainingArguments(**{**settings, **extra})


def review_split(
    folder: Path, owners: int, reviews: int, *, test: int = 0, scheme: str = "iid", seed: int = 0, **params: Any
) -> Any:
    """``reviews`` balanced real reviews dealt to ``owners`` parties (``scheme``: a fedfleet partitioner), plus
    ``test`` more held out; a ``fedfleet.hf.data.PartySplit``. The same arguments give the same files."""
    from fedfleet.hf.data import split_csv, write_reviews_csv

    everything = write_reviews_csv(folder / "all", limit=reviews + test, seed=seed)
    fraction = test / (reviews + test)
    return split_csv(everything, folder / "split", owners, scheme=scheme, seed=seed, test_fraction=fraction, **params)
