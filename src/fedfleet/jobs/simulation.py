"""Build a simulated federation from a typed job config, or from your own objects, and run it.

``Simulation.from_config(job)`` does every check that can fail (names, parameters, data paths, the model's
output size) before it creates anything on disk; ``run()`` then trains, writes the run folder and
returns the history. A job with a ``fedbuff`` section runs asynchronously (``core.async_loop``): one record
per server step instead of per round.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.config.schema import FedBuffConfig, JobConfig
from fedfleet.core.async_loop import AsyncLoop, FedBuff
from fedfleet.core.async_staleness import build_staleness
from fedfleet.core.clock import VirtualClock
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
from fedfleet.core.pipeline import EMPTY, Pipeline
from fedfleet.core.round_end import RoundEnd, build_round_end
from fedfleet.data import FederatedDataset
from fedfleet.errors import ConfigError
from fedfleet.jobs.assemble import (
    build_parts,
    check_folds_fit_the_strategy,
    fit_config,
    pipeline_of,
    resolve_device,
    selector_of,
    set_threads,
)
from fedfleet.runtime.ray import RayOptions, RayRuntime
from fedfleet.runtime.sim import make_runtime
from fedfleet.select import build_selector
from fedfleet.strategy import Strategy, build_strategy
from fedfleet.traces import SystemTraces, build_traces

log = logging.getLogger("fedfleet.simulation")


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
        rounds: int = JobConfig.rounds,
        cohort: int = JobConfig.cohort,
        client: FitConfig | None = None,
        seed: int = JobConfig.seed,
        eval_every: int = JobConfig.eval_every,
        vectorize: str = "auto",
        loss: nn.Module | None = None,
        optimizer: str = "sgd",
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        device: str = "auto",
        ray: RayOptions | None = None,
        selector: Any = "uniform",
        traces: SystemTraces | None = None,
        round_end: RoundEnd | str | None = None,
        target_accuracy: float | None = None,
        fedbuff: FedBuff | None = None,
        threads: int | None = None,
        pipeline: Pipeline | None = None,
    ) -> Simulation:
        """The Python API: your model and data, no config file needed, with a job file's defaults (``JobConfig``,
        ``FitConfig``: the same job gives the same model either way); ``ray`` trains on a Ray cluster;
        ``fedbuff`` runs asynchronous buffered aggregation (``rounds`` server steps) instead of rounds;
        ``threads``: torch threads for training (default: one for a small model on a CPU, see ``set_threads``);
        ``pipeline``: the aggregation pipeline's transforms (``fedfleet.transforms.build_pipeline``)."""
        dev = resolve_device(device)
        set_threads(threads, model, dev)
        federation = federation.to(dev)
        test = test.to(dev) if test is not None and hasattr(test, "to") else test
        pipeline = pipeline or EMPTY
        trainer = TorchTrainer(model, loss, optimizer=optimizer, device=dev, update_transforms=pipeline.client)
        strat = build_strategy(strategy) if isinstance(strategy, str) else strategy
        # FedBuff weighs each arrival by its staleness: its Ray workers send every client's delta, not a partial
        folds = None if fedbuff else strat
        runtime = (
            make_runtime(trainer, federation, test, vectorize)
            if ray is None
            else RayRuntime(trainer, federation, test, strategy=folds, options=ray, pipeline=pipeline)
        )
        sel = build_selector(selector) if isinstance(selector, str) else selector
        params, fit = trainer.params.clone(), client or FitConfig()
        if fedbuff is not None:
            if round_end is not None:
                raise ValueError(
                    "round_end ends synchronous rounds; a FedBuff server step ends after `buffer` arrivals"
                )
            config = LoopConfig(rounds, fedbuff.concurrency, seed, eval_every, target=target_accuracy)
            sizes = federation.sizes().cpu().numpy()
            clock = VirtualClock(traces=traces)
            loop: RoundLoop = AsyncLoop(
                strat, runtime, sel, params, fit, config, fedbuff, sizes, callbacks, clock, pipeline
            )
            return cls(loop, trainer, federation)
        config = LoopConfig(rounds=rounds, cohort=cohort, seed=seed, eval_every=eval_every, target=target_accuracy)
        system = _system(traces, round_end, federation)
        loop = RoundLoop(strat, runtime, sel, params, fit, config, callbacks, **system, pipeline=pipeline)
        return cls(loop, trainer, federation)

    @classmethod
    def from_config(cls, job: JobConfig, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> Simulation:
        strategy = build_strategy(job.strategy.name, **job.strategy.params)
        selector = selector_of(job)
        fedbuff = _fedbuff(job.fedbuff, job.cohort) if job.fedbuff is not None else None
        parts = build_parts(job)
        federation, trainer = parts.federation, parts.trainer
        cohort, key = (job.cohort, "cohort") if fedbuff is None else (fedbuff.concurrency, "fedbuff.concurrency")
        if cohort > federation.num_clients:
            raise ConfigError(
                f"{key} {cohort} is larger than the {federation.num_clients} clients; lower {key} or raise data.clients"
            )
        test_data = parts.test.to(parts.device) if len(parts.test.y) else None
        folds = strategy if fedbuff is None else None  # FedBuff needs each client's delta (staleness weights)
        pipeline = pipeline_of(job, federation.num_clients)  # its party-side chain is already the trainer's
        check_folds_fit_the_strategy(pipeline, strategy)
        for attack in pipeline.client:  # a data attack (label_flip) poisons its clients' rows once, here
            if hasattr(attack, "poison"):
                log.info("%s: %d clients train on poisoned data", type(attack).__name__, attack.poison(federation))
        runtime = RUNTIMES[job.runtime.kind](job, trainer, federation, test_data, folds)
        fit = fit_config(job)
        config = LoopConfig(
            rounds=job.rounds,
            cohort=cohort,
            seed=job.seed,
            eval_every=job.eval_every,
            target=job.system.target_accuracy if job.system is not None else None,
        )
        params, system = trainer.params.clone(), _job_system(job, federation)
        if fedbuff is None:
            loop = RoundLoop(strategy, runtime, selector, params, fit, config, callbacks, **system, pipeline=pipeline)
            return cls(loop, trainer, federation, job)
        clock = system.get("clock", VirtualClock())  # no system section: every client on the default device
        sizes = federation.sizes().cpu().numpy()
        try:
            loop = AsyncLoop(
                strategy, runtime, selector, params, fit, config, fedbuff, sizes, callbacks, clock, pipeline
            )
        except ValueError as exc:  # e.g. a strategy whose own aggregator would ignore the staleness weights
            raise ConfigError(f"fedbuff: {exc}") from None
        return cls(loop, trainer, federation, job)

    def run(self) -> list[RoundRecord]:
        return self.loop.run()

    def save_model(self, path: str | Path) -> None:
        """Write the global params (safetensors) for use outside fedfleet."""
        from fedfleet.core.serialize import save_params

        save_params(self.loop.global_params, path)


def _system(traces: SystemTraces | None, round_end: RoundEnd | str | None, federation: Any) -> dict[str, Any]:
    """The loop's simulated system: per-client traces, the round-end policy and the clients' data sizes
    (so the loop can plan each round before training). Nothing of it: the default device for everyone."""
    if traces is None and round_end is None:
        return {}
    policy = build_round_end(round_end) if isinstance(round_end, str) else round_end
    sizes = federation.sizes().cpu().numpy()
    return {"clock": VirtualClock(traces=traces), "round_end": policy, "client_sizes": sizes}


def _job_system(job: JobConfig, federation: Any) -> dict[str, Any]:
    if job.system is None:
        return {}
    traces = build_traces(job.system.traces.name, federation.num_clients, job.seed, **job.system.traces.params)
    return _system(traces, build_round_end(job.system.round_end.name, **job.system.round_end.params), federation)


def _fedbuff(section: FedBuffConfig, cohort: int) -> FedBuff:
    """The section's hyperparameters; ``concurrency`` defaults to the cohort (how many clients work at once)."""
    return FedBuff(
        buffer=section.buffer,
        concurrency=section.concurrency if section.concurrency is not None else cohort,
        staleness=build_staleness(section.staleness.name, **section.staleness.params),
        weight_by_examples=section.weight_by_examples,
        max_staleness=section.max_staleness,
    )


def _in_process(job: JobConfig, trainer: TorchTrainer, federation: FederatedDataset, test: Any, strategy: Any) -> Any:
    return make_runtime(trainer, federation, test, job.runtime.vectorize)


def _on_ray(job: JobConfig, trainer: TorchTrainer, federation: FederatedDataset, test: Any, strategy: Any) -> Any:
    rt = job.runtime
    gpus = rt.gpus_per_worker if rt.gpus_per_worker is not None else float(trainer.device.type == "cuda")
    options = RayOptions(
        workers=rt.workers,
        address=rt.address,
        cpus_per_worker=rt.cpus_per_worker or 1.0,
        gpus_per_worker=gpus,
        vectorize=rt.vectorize,
    )
    return RayRuntime(
        trainer, federation, test, strategy=strategy, options=options, pipeline=pipeline_of(job, federation.num_clients)
    )


# runtime.kind -> how the job's runtime is built (a new kind is a function and a row)
RUNTIMES = {"simulation": _in_process, "ray": _on_ray}
