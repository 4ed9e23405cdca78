"""The parts every job is built from, the same way in simulation and deployment: data, model, trainer.

Simulation and a deployed party must build bit-identical models and client shards from one job file, so
a deployed run can be checked against its simulation; this module is the one place that builds them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.client.tasks import output_widths
from fedfleet.config.schema import JobConfig
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import Pipeline
from fedfleet.data import FederatedDataset, load_dataset, partition, train_test_split
from fedfleet.data.datasets import Dataset
from fedfleet.errors import ConfigError, DataError
from fedfleet.models import build_model
from fedfleet.privacy import PrivacyPlan, plan_privacy
from fedfleet.registry import construct
from fedfleet.secagg.in_process import SecureAggregation
from fedfleet.select import PoissonSelector, Selector, build_selector
from fedfleet.transforms import JobFacts, build_pipeline

log = logging.getLogger(__name__)

# Below this many params one training step is too short for torch's intra-op threads to pay off reliably: beside
# any other busy process they spin-wait on each other, 2-5x slower on 2 cores (up to 100x under heavier load); on
# an otherwise idle machine 2 threads win by up to 1.6x for the larger of these models (benchmarks/threads.py)
ONE_THREAD_BELOW = 10_000_000


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device is {name!r} but no CUDA device is available; use runtime.device: cpu")
    return device


def set_threads(threads: int | None, model: nn.Module, device: torch.device) -> int:
    """Set torch's intra-op threads for local training and return them: ``threads`` if given; else (auto) one
    thread for a model under ``ONE_THREAD_BELOW`` params on a CPU, unless OMP_NUM_THREADS says otherwise."""
    if threads is not None:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        size = sum(p.numel() for p in model.parameters())
        if size < ONE_THREAD_BELOW and torch.get_num_threads() > 1:
            log.info("training with 1 torch thread: the model has %d params (runtime.threads sets more)", size)
            torch.set_num_threads(1)
    return torch.get_num_threads()


def check_model_output(model: nn.Module, x: torch.Tensor, num_classes: int, model_name: str) -> None:
    """One forward pass on two examples, so a mismatch is an error now, not a crash in round 1."""
    with torch.no_grad():
        try:
            out = model(x[:2])
        except RuntimeError as exc:
            raise DataError(f"model {model_name!r} cannot take inputs of shape {tuple(x.shape[1:])}: {exc}") from None
    if out.dim() != 2 or out.shape[1] not in output_widths(num_classes):  # two classes: one logit will do
        raise DataError(
            f"model {model_name!r} outputs shape {tuple(out.shape[1:])} per example but the dataset has "
            f"{num_classes} classes; make its last layer output {num_classes} values"
        )


@dataclass
class JobParts:
    dataset: Dataset
    train: Dataset
    test: Dataset
    federation: FederatedDataset  # the train split dealt out to the clients
    trainer: TorchTrainer
    device: torch.device


# torch's generator is one per process: an arbiter and parties built in threads of one process (a test, a notebook)
# drew each other's numbers, and the arbiter's initial model differed from the seeded one (1 run in 8, measured)
_SEEDED_BUILD = threading.Lock()


def build_parts(job: JobConfig, clients: int | None = None) -> JobParts:
    """Data split, partition over ``clients`` (default ``data.clients``), seeded initial model, trainer."""
    device = resolve_device(job.runtime.device)
    dataset = load_dataset(job.data.dataset.name, **job.data.dataset.params)
    train, test = train_test_split(dataset, job.data.test_fraction, job.seed)
    parts = partition(
        job.data.partition.name,
        train.keys if job.data.partition.name == "natural" else train.y.numpy(),
        clients if clients is not None else job.data.clients,
        job.seed,
        **job.data.partition.params,
    )
    federation = FederatedDataset.from_partition(train.x, train.y, parts, dataset.num_classes).to(device)
    with _SEEDED_BUILD:  # the initial global model is part of the seeded run
        torch.manual_seed(job.seed)
        model = build_model(
            job.model.name, dataset.input_shape, dataset.num_classes, features=dataset.features, **job.model.params
        )
    check_model_output(model, train.x, dataset.num_classes, job.model.name)
    set_threads(job.runtime.threads, model, device)
    trainer = construct(
        TorchTrainer,
        {
            "model": model,
            "optimizer": job.client.optimizer,
            "momentum": job.client.momentum,
            "weight_decay": job.client.weight_decay,
            "keep_local": job.client.keep_local,
            "device": device,
            "update_transforms": pipeline_of(job, federation.num_clients).client,
        },
        "client",
    )
    return JobParts(dataset, train, test, federation, trainer, device)


def pipeline_of(job: JobConfig, population: int | None = None) -> Pipeline:
    """The job's aggregation pipeline: its party-side chain goes into the trainer, its fold chain into the loop.
    ``population``: the clients (or deployed parties) a round draws from; default ``data.clients``."""
    t = job.transforms
    population = population if population is not None else job.data.clients
    # what a transform checks itself against: the updates a round (or a FedBuff step) folds, the clients
    cohort, key = (job.cohort, "cohort") if job.fedbuff is None else (job.fedbuff.buffer, "fedbuff.buffer")
    facts = JobFacts(cohort, key, population, job.seed)
    pipeline = build_pipeline([(n.name, n.params) for n in t.client], [(n.name, n.params) for n in t.server], facts)
    if job.privacy is not None:  # the party adds its noise after the job's own transforms, the arbiter accounts
        weight = job.secure_aggregation.max_weight if job.secure_aggregation is not None else 1.0
        plan = plan_privacy(job.privacy, job.rounds, job.cohort, population, job.seed, party_weight=weight)
        check_coordinate_range(job, plan)
        pipeline = Pipeline(pipeline.client + plan.party, pipeline.server + plan.fold)
    if job.secure_aggregation is None:
        return pipeline
    return dataclasses.replace(pipeline, secure=SecureAggregation(job.secure_aggregation, session=job.name))


def check_coordinate_range(job: JobConfig, plan: PrivacyPlan) -> None:
    """Secure aggregation clips each coordinate to [-clip, clip] after the party's noise; a clipped coordinate
    would bend the Gaussian the accountant assumes. A coordinate of a delta within C, plus 6 noise stds, stays
    inside but for odds of 2e-9."""
    if job.secure_aggregation is None or job.privacy.where == "central":
        return
    party = plan.party[-1]
    need = party.clip + 6.0 * party.std
    if job.secure_aggregation.clip < need:
        raise ConfigError(
            f"secure_aggregation.clip = {job.secure_aggregation.clip:g} would clip the noised coordinates "
            f"(privacy.clip {party.clip:g} + 6 x the party's noise std {party.std:.4g}): set it to at least {need:.4g}"
        )


def check_folds_fit_the_strategy(pipeline: Pipeline, strategy: Any) -> None:
    """Before any party trains: each fold transform's round-start check against the strategy's aggregator (a
    robust rule or DP needs a weighted mean, q-FedAvg folds something else; a privacy budget too small for one
    round), on a one-element probe. A real round runs the same check again."""
    probe = FlatParams.from_tensors({"probe": torch.zeros(1)})
    for transform in pipeline.server:
        start = getattr(transform, "start_round", None)
        if start is not None:
            start(probe, strategy.aggregator(probe))


def selector_of(job: JobConfig) -> Selector:
    """The job's selector; Poisson sampling where the privacy accountant assumes it (``privacy.sampling``)."""
    p = job.privacy
    if p is not None and p.sampling == "poisson" and p.where != "local":
        return PoissonSelector(secret=p.noise == "secure")
    return build_selector(job.selector.name, **job.selector.params)


def fit_config(job: JobConfig) -> FitConfig:
    c = job.client
    return FitConfig(epochs=c.epochs, steps=c.steps, batch_size=c.batch_size, lr=c.lr)
