"""Build a simulated federation from a typed job config, or from your own objects, and run it.

``Simulation.from_config(job)`` does every check that can fail (names, parameters, data paths, the model's
output size) before it creates anything on disk; ``run()`` then trains, writes the run folder and
returns the history.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from fedfleet.assemble import build_parts, fit_config, resolve_device
from fedfleet.client import TorchTrainer
from fedfleet.config.schema import JobConfig
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
from fedfleet.data import FederatedDataset
from fedfleet.errors import ConfigError
from fedfleet.runtime.sim import make_runtime
from fedfleet.select import build_selector
from fedfleet.strategy import Strategy, build_strategy


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
        parts = build_parts(job)
        federation, trainer = parts.federation, parts.trainer
        if job.cohort > federation.num_clients:
            raise ConfigError(
                f"cohort {job.cohort} is larger than the {federation.num_clients} clients; "
                f"lower cohort or raise data.clients"
            )
        test_data = parts.test.to(parts.device) if len(parts.test.y) else None
        runtime = make_runtime(trainer, federation, test_data, job.runtime.vectorize)
        fit = fit_config(job)
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
