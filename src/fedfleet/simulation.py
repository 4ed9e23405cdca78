"""Build a simulated federation from a typed job config, or from your own objects, and run it.

``Simulation.from_config(job)`` does every check that can fail (names, parameters, data paths, the model's
output size) before it creates anything on disk; ``run()`` then trains, writes the run folder and
returns the history.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.config.schema import JobConfig
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
from fedfleet.data import FederatedDataset, load_dataset, partition, train_test_split
from fedfleet.errors import ConfigError, DataError
from fedfleet.models import build_model
from fedfleet.registry import construct
from fedfleet.runtime.sim import make_runtime
from fedfleet.select import build_selector
from fedfleet.strategy import Strategy, build_strategy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device is {name!r} but no CUDA device is available; use runtime.device: cpu")
    return device


def check_model_output(model: nn.Module, x: torch.Tensor, num_classes: int, model_name: str) -> None:
    """One forward pass on two examples, so a mismatch is an error now, not a crash in round 1."""
    with torch.no_grad():
        try:
            out = model(x[:2])
        except RuntimeError as exc:
            raise DataError(f"model {model_name!r} cannot take inputs of shape {tuple(x.shape[1:])}: {exc}") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise DataError(
            f"model {model_name!r} outputs shape {tuple(out.shape[1:])} per example but the dataset has "
            f"{num_classes} classes; make its last layer output {num_classes} values"
        )


@dataclasses.dataclass
class Simulation:
    """The assembled parts of one simulated job; ``loop`` runs it."""

    loop: RoundLoop
    trainer: TorchTrainer
    federation: FederatedDataset
    job: JobConfig | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        federation: FederatedDataset,
        *,
        test: Any = None,
        strategy: Strategy | str = "fedavg",
        rounds: int = 10,
        cohort: int = 10,
        client: FitConfig | None = None,
        seed: int = 0,
        eval_every: int = 1,
        vectorize: str = "auto",
        loss: nn.Module | None = None,
        optimizer: str = "sgd",
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        device: str = "auto",
    ) -> Simulation:
        """The Python API: your model and data, no config file needed."""
        dev = resolve_device(device)
        federation = federation.to(dev)
        test = test.to(dev) if test is not None and hasattr(test, "to") else test
        trainer = TorchTrainer(model, loss, optimizer=optimizer, device=dev)
        strat = build_strategy(strategy) if isinstance(strategy, str) else strategy
        runtime = make_runtime(trainer, federation, test, vectorize)
        loop = RoundLoop(
            strat,
            runtime,
            build_selector("uniform"),
            trainer.params.clone(),
            client or FitConfig(),
            LoopConfig(rounds=rounds, cohort=cohort, seed=seed, eval_every=eval_every),
            callbacks,
        )
        return cls(loop, trainer, federation)

    @classmethod
    def from_config(cls, job: JobConfig, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> Simulation:
        strategy = build_strategy(job.strategy.name, **job.strategy.params)
        selector = build_selector(job.selector.name, **job.selector.params)
        device = resolve_device(job.runtime.device)
        dataset = load_dataset(job.data.dataset.name, **job.data.dataset.params)
        train, test = train_test_split(dataset, job.data.test_fraction, job.seed)
        parts = partition(
            job.data.partition.name,
            train.keys if job.data.partition.name == "natural" else train.y.numpy(),
            job.data.clients,
            job.seed,
            **job.data.partition.params,
        )
        federation = FederatedDataset.from_partition(train.x, train.y, parts, dataset.num_classes).to(device)
        if job.cohort > federation.num_clients:
            raise ConfigError(
                f"cohort {job.cohort} is larger than the {federation.num_clients} clients; "
                f"lower cohort or raise data.clients"
            )
        torch.manual_seed(job.seed)  # the initial global model is part of the seeded run
        model = build_model(job.model.name, dataset.input_shape, dataset.num_classes, **job.model.params)
        check_model_output(model, train.x, dataset.num_classes, job.model.name)
        trainer = construct(
            TorchTrainer,
            {
                "model": model,
                "optimizer": job.client.optimizer,
                "momentum": job.client.momentum,
                "weight_decay": job.client.weight_decay,
                "device": device,
            },
            "client",
        )
        test_data = test.to(device) if len(test.y) else None
        runtime = make_runtime(trainer, federation, test_data, job.runtime.vectorize)
        fit = FitConfig(
            epochs=job.client.epochs, steps=job.client.steps, batch_size=job.client.batch_size, lr=job.client.lr
        )
        loop = RoundLoop(
            strategy,
            runtime,
            selector,
            trainer.params.clone(),
            fit,
            LoopConfig(rounds=job.rounds, cohort=job.cohort, seed=job.seed, eval_every=job.eval_every),
            callbacks,
        )
        return cls(loop, trainer, federation, job)

    def run(self) -> list[RoundRecord]:
        return self.loop.run()

    def save_model(self, path: str | Path) -> None:
        """Write the global params (safetensors) for use outside fedfleet."""
        from fedfleet.core.serialize import save_params

        save_params(self.loop.global_params, path)
