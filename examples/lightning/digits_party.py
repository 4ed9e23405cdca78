"""A Lightning training made federated with one callback: an MLP on scikit-learn's handwritten digits.

In three terminals (mutual TLS with certificates from `fedfleet certs`; --insecure skips TLS on a trusted
network):

    python examples/lightning/digits_party.py --role arbiter --party-id 10000
    python examples/lightning/digits_party.py --role guest --party-id 9999
    python examples/lightning/digits_party.py --role host --party-id 10000

Each data owner trains on its own share of the 1,797 real digits shipped in scikit-learn's wheel and syncs
with the other through the arbiter every epoch (or every N optimizer steps with --aggregate step --freq N).
`--devices 2 --strategy ddp` makes a party two DDP processes (gloo on CPU) of which only rank 0 talks to
the arbiter. `DigitsMLP` and `DigitsData` are a plain LightningModule and LightningDataModule: the only
federated line is the callback given to the Trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsMLP(pl.LightningModule):
    """8x8 grey digits (64 inputs) -> 10 classes; Adam with a step LR schedule, so both persist across syncs."""

    flops_per_batch = None  # ThroughputMonitor then logs samples/s and batches/s, no FLOP utilisation

    def __init__(self, hidden: int = 64, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)  # the session starts everyone from the first party's params anyway
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10) logits
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class DigitsData(pl.LightningDataModule):
    """Share ``part`` of ``parts`` of the digits' training split (``limit``: at most that many examples);
    every party validates on the same held-out 20%."""

    def __init__(self, part: int, parts: int, batch_size: int = 32, limit: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.part, self.parts, self.batch_size, self.limit, self.seed = part, parts, batch_size, limit, seed

    def setup(self, stage: str) -> None:
        from fedfleet.data.datasets import load_dataset
        from fedfleet.data.splits import train_test_split

        train, held_out = train_test_split(load_dataset("digits"), 0.2, seed=self.seed)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
        share = order.chunk(self.parts)[self.part][: self.limit]
        self.train_set = TensorDataset(train.x[share], train.y[share])
        self.val_set = TensorDataset(held_out.x, held_out.y)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["guest", "host", "arbiter"], required=True)
    p.add_argument("--party-id", required=True, help="this party's id (guest 9999, host 10000, arbiter 10000)")
    p.add_argument("--guest", default="9999", help="the guest's party id")
    p.add_argument("--hosts", default="10000", help="the hosts' party ids, comma-separated")
    p.add_argument("--arbiter-id", default="10000")
    p.add_argument("--session", default="digits-lightning", help="the federation session id (the same everywhere)")
    p.add_argument("--address", default="127.0.0.1:50051", help="where the arbiter listens / parties dial")
    p.add_argument("--certs", default="certs", help="folder from `fedfleet certs` (ca.crt, <role>-<id>.crt/.key)")
    p.add_argument("--insecure", action="store_true", help="plaintext, for a trusted network only")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--limit", type=int, help="train on at most this many of the party's examples")
    p.add_argument("--aggregate", choices=["epoch", "step"], default="epoch")
    p.add_argument("--freq", type=float, default=1, help="epochs or steps between syncs (a fraction: of the run)")
    p.add_argument("--devices", type=int, default=1, help="processes (or GPUs) of this party")
    p.add_argument("--strategy", default="auto", help="Lightning's strategy: auto, ddp, deepspeed_stage_2, ...")
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    p.add_argument("--logger", choices=["csv", "tensorboard", "none"], default="csv")
    p.add_argument("--work", default="runs/digits-lightning", help="folder for logs and the saved model")
    return p.parse_args(argv)


def parties(args: argparse.Namespace) -> list[tuple[str, str]]:
    hosts = [("host", h) for h in args.hosts.split(",") if h]
    return [("guest", args.guest), *hosts, ("arbiter", args.arbiter_id)]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from fedfleet.lightning import FedArguments, FedAvgServer, FedLightningCallback, create_context

    everyone = parties(args)
    ctx = create_context(
        (args.role, args.party_id), everyone, args.session, args.address, certs=args.certs, insecure=args.insecure
    )
    if ctx.is_arbiter:
        history = FedAvgServer(ctx).train()
        print(json.dumps({"rounds": len(history), "train_loss": [r.metrics.get("train_loss") for r in history]}))
        return 0

    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    work = Path(args.work) / ctx.name
    owners = [f"{r}-{i}" for r, i in everyone if r != "arbiter"]
    data = DigitsData(owners.index(ctx.name), len(owners), args.batch_size, args.limit)
    loggers = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
    freq = int(args.freq) if float(args.freq).is_integer() else args.freq
    fed = FedLightningCallback(ctx, FedArguments(aggregate_strategy=args.aggregate, aggregate_freq=freq))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        logger=False if args.logger == "none" else loggers[args.logger](str(work), name="logs"),
        callbacks=[fed, ThroughputMonitor(batch_size_fn=lambda batch: batch[0].shape[0], window_size=4)],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = DigitsMLP(lr=args.lr)
    trainer.fit(module, data)
    if not trainer.is_global_zero:
        return 0  # rank 0 speaks for the party
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(work / "model.safetensors"))
    losses = [r.round_train_loss for r in fed.history]
    print(
        json.dumps(
            {
                "party": ctx.name,
                "syncs": fed.syncs,
                "weights": fed.weights,
                "round_train_loss": losses,
                "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan"))),
                "world_size": trainer.world_size,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
