"""What runs inside one Ray actor: a trainer built once, the data landed once, shares of cohorts trained in turn.

A worker trains its share of a round's cohort with an in-process runtime from ``make_runtime`` (the same trainer
code and the same per-client seeds as a single-process simulation) and folds them with the strategy's own
aggregator, so it sends back one unfinished, model-sized partial however many clients it trained.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedfleet.client.torch_trainer import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import NO_STATS, TrainStats
from fedfleet.runtime.ray.ship import Shipped, land, ship
from fedfleet.runtime.sim import make_runtime


@dataclass(frozen=True)
class ExchangedNames:
    """Selects the params a trainer exchanges by name (a picklable ``exchange`` selector)."""

    names: frozenset[str]

    def __call__(self, name: str, param: nn.Parameter) -> bool:
        return name in self.names


@dataclass(frozen=True)
class TrainerFactory:
    """How a worker builds its :class:`TorchTrainer`: a copy of the driver's model and its training settings.

    Shipped to each worker once, when it starts; rounds then move only params.
    """

    model: nn.Module
    loss: Any
    optimizer: str
    momentum: float
    weight_decay: float
    exchange: ExchangedNames
    keep_local: tuple[str, ...]
    eval_batch_size: int
    update_transforms: tuple[Any, ...] = ()  # the party-side chain of the pipeline

    @classmethod
    def from_trainer(cls, trainer: TorchTrainer) -> TrainerFactory:
        # a deep copy gives every parameter its own storage again (the trainer's are views into one flat
        # buffer) and keeps the non-exchanged state (frozen weights, BatchNorm statistics) the driver has
        model = copy.deepcopy(trainer.model).cpu()
        for p in model.parameters():
            p.grad = None
        return cls(
            model=model,
            loss=trainer.loss,
            optimizer=trainer.optimizer,
            momentum=trainer.momentum,
            weight_decay=trainer.weight_decay,
            exchange=ExchangedNames(frozenset(trainer.params.spec.names)),
            keep_local=trainer.keep_local,
            eval_batch_size=trainer.eval_batch_size,
            update_transforms=trainer.pipeline.client,
        )

    def build(self, device: str | torch.device) -> TorchTrainer:
        return TorchTrainer(
            self.model,
            self.loss,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            exchange=self.exchange,
            keep_local=self.keep_local,
            device=device,
            eval_batch_size=self.eval_batch_size,
            update_transforms=self.update_transforms,
        )


@dataclass(frozen=True)
class ClientRecord:
    """One client's part of a worker's answer: everything of its update but the params."""

    client_id: int | str
    weight: float
    metrics: dict[str, float]
    is_delta: bool
    stats: TrainStats = NO_STATS


@dataclass(frozen=True)
class WorkerResult:
    """A worker's answer for its share of a round, clients in cohort order: ``partial`` set, the share folded
    by the strategy's own aggregator (unfinished, so the driver merges it); else one delta per record."""

    records: list[ClientRecord]
    params: list[Shipped]
    partial: Shipped | None


class Worker:
    """The actor class (``ray.remote`` is applied by the runtime, so this module imports without Ray)."""

    def __init__(
        self,
        factory: Shipped,
        federation: Shipped,
        test_data: Shipped | None,
        threads: int,
        device: str,
        vectorize: str,
    ) -> None:
        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not every core of the node
        trainer = land(factory, writable=True).build(device)
        data = land(federation).to(device)  # read-only: clients' data is only indexed
        test = land(test_data) if test_data is not None else None
        test = test.to(device) if test is not None and hasattr(test, "to") else test
        self.trainer = trainer
        self.device = torch.device(device)
        # the single-process code: sequential, or the cohort vectorised where ``vectorize`` asks and allows (auto:
        # decided for each round's share, so each worker vectorises its own share where that wins)
        self.runtime = make_runtime(trainer, data, test, vectorize)
        self.global_params = trainer.params.zeros_like()  # this worker's copy of each round's global params
        self.partial = trainer.params.zeros_like()

    def ready(self) -> int:
        return os.getpid()

    def runtime_kind(self) -> str:
        """Which in-process runtime trains this worker's shares (``AutoRuntime`` picks per share and round)."""
        return type(self.runtime).__name__

    def fit(self, global_params: Shipped, clients: list[int], config: FitConfig, fold: Any) -> WorkerResult:
        """Train ``clients``; given ``fold`` (the strategy and the pipeline), fold them here into the round's
        aggregator (fold transforms included) and send that partial."""
        self.global_params.copy_(land(global_params))
        records: list[ClientRecord] = []
        params: list[Shipped] = []
        aggregator = fold[1].aggregator(fold[0], self.global_params) if fold is not None else None
        for update in self.runtime.fit(self.global_params, clients, config):
            records.append(
                ClientRecord(update.client_id, float(update.weight), update.metrics, update.is_delta, update.stats)
            )
            if aggregator is not None:
                aggregator.add(update)  # folded now: the trainer reuses its delta buffer for the next client
            else:
                params.append(ship(update.params.clone()))
        return WorkerResult(records, params, ship(aggregator) if aggregator is not None else None)

    def local_rows(self) -> Shipped:
        """The rows of ``keep_local`` params this worker's clients keep (clients stay on one worker)."""
        return ship(self.trainer.local.rows if self.trainer.local is not None else {})

    def set_local_rows(self, rows: Shipped) -> None:
        """Put back the rows a checkpoint kept for this worker's clients."""
        self.trainer.local.rows = {
            client: {n: (i.to(self.device), v.to(self.device)) for n, (i, v) in tables.items()}
            for client, tables in land(rows).items()
        }

    def evaluate(self, global_params: Shipped, *other_rows: Shipped) -> dict[str, float]:
        """Central evaluation; ``other_rows``: the other workers' clients' local rows, which a personalised
        central model needs too (see ``LocalParams.applied``)."""
        self.global_params.copy_(land(global_params))
        local = self.trainer.local
        if local is None or not other_rows:
            return self.runtime.evaluate(self.global_params)
        own = local.rows
        local.rows = dict(own)
        for rows in other_rows:  # disjoint: each client is trained by one worker only
            for client, tables in land(rows).items():
                local.rows[client] = {n: (i.to(self.device), v.to(self.device)) for n, (i, v) in tables.items()}
        try:
            return self.runtime.evaluate(self.global_params)
        finally:
            local.rows = own


def land_params(shipped: Shipped, like: FlatParams) -> FlatParams:
    """Received params on ``like``'s device, checked against the layout they must have."""
    params = land(shipped)
    if not isinstance(params, FlatParams) or params.spec != like.spec:
        raise ValueError(f"a Ray worker sent params of layout {getattr(params, 'spec', None)}, expected {like.spec}")
    return params if params.device == like.device else params.to(like.device)
