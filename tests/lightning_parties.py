"""Helpers for the Lightning tests: the example's digits module and data, and callbacks that record the
params each party sends and holds, read from the model itself (not from the sync callback's buffer)."""

from __future__ import annotations

import importlib.util
import sys

import lightning.pytorch as pl
import torch

from tests.paths import ROOT

EXAMPLE = ROOT / "examples" / "lightning" / "digits_party.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("digits_party_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Lightning pickles hyperparameters by module name
    spec.loader.exec_module(module)
    return module


example = _load_example()
DigitsMLP, DigitsData = example.DigitsMLP, example.DigitsData


def trainable_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters() if p.requires_grad])


class Before(pl.Callback):
    """Placed before the sync callback: the params a party sends at each of its sync points."""

    def __init__(self, fed) -> None:
        self.fed = fed
        self.snapshots: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fed.due(trainer.global_step):
            self.snapshots.append(trainable_vector(pl_module))


class After(pl.Callback):
    """Placed after it: the params at the start (index 0) and after each sync."""

    def __init__(self, fed) -> None:
        self.fed = fed
        self.snapshots: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.snapshots.append(trainable_vector(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fed.syncs > len(self.snapshots) - 1:
            self.snapshots.append(trainable_vector(pl_module))


def make_trainer(fed, epochs: int = 2, **kwargs) -> tuple[pl.Trainer, Before, After]:
    before, after = Before(fed), After(fed)
    defaults = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    callbacks = [before, fed, after, *defaults.pop("callbacks", [])]
    return pl.Trainer(callbacks=callbacks, **defaults), before, after
