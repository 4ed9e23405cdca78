"""``FedLightningCallback``: an existing LightningModule + DataModule training becomes a federated party.

    trainer = L.Trainer(max_epochs=3, callbacks=[FedLightningCallback(ctx, FedArguments("epoch", 1))])
    trainer.fit(module, datamodule)

When training starts every party loads the session's initial params (the first party's), so all train
the same model. After every ``aggregate_freq`` of the run (N epochs, N optimizer steps or a fraction)
and at the last step, the party sends its trainable params, weighted by the examples it trained on since the
last sync, and continues from the weighted mean with its own optimizer state and LR schedule. The sync
runs at the end of the batch, before Lightning's validation, so validation sees the aggregated model.
With several ranks (DDP, DeepSpeed) only global rank 0 talks to the arbiter and broadcasts the result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from fedfleet.core.params import Selector
from fedfleet.core.update import TrainStats
from fedfleet.errors import ConfigError
from fedfleet.lightning.access import lightning_access
from fedfleet.lightning.batches import batch_loss, batch_size
from fedfleet.lightning.records import SyncRecord
from fedfleet.sync.access import ParamAccess
from fedfleet.sync.args import FedArguments
from fedfleet.sync.driver import Ranks, SyncDriver
from fedfleet.sync.threads import PartyThreads, check_threads, choose_threads, parties_at_once

log = logging.getLogger("fedfleet.lightning")


class FedLightningCallback(pl.Callback):
    """Makes ``trainer.fit`` a federated party of the session ``ctx`` (gRPC or a ``LocalFederation``).

    ``select``: which params travel (``"trainable"``: those with ``requires_grad``; ``"all"``,
    ``"re:<regex>"`` or a callable). ``batch_size_fn(batch) -> int`` counts a batch's examples when its
    first tensor's leading dimension is not that. ``timeout``: seconds to wait for the others at a sync.
    ``seed``: the seed of this in-process party's random state while it takes its turns, and of randomised
    transforms. ``update_transforms``: the aggregation pipeline's party-side chain (``fedfleet.transforms``).
    ``threads``: torch's CPU threads while training (None: 1 for a module under 10M params, as the simulation
    trains, else torch's own, shared out among in-process parties that train at once; ``fedfleet.sync.threads``).
    Each sync is kept in ``history`` and logged to every logger of the trainer under ``fed/``.
    """

    def __init__(
        self,
        ctx: Any,
        fed_args: FedArguments | None = None,
        select: Selector = "trainable",
        batch_size_fn: Callable[[Any], int] | None = None,
        timeout: float | None = None,
        seed: int | None = None,
        update_transforms: Sequence[Any] = (),
        threads: int | None = None,
    ) -> None:
        if getattr(ctx, "is_arbiter", False):
            raise ConfigError("this context is the arbiter's: it does not train; run FedAvgServer(ctx).train() there")
        self.ctx = ctx
        self.fed_args = fed_args or FedArguments()
        self.select = select
        self.batch_size_fn = batch_size_fn or batch_size
        self.timeout = timeout
        self.threads = check_threads(threads)
        self._threads = PartyThreads(None, "")
        # in-process parties (a LocalFederation) train in turns from ``setup`` on, each with its own random
        # state seeded from this (default: torch's seed when the callback is made, e.g. seed_everything's)
        self.seed = torch.initial_seed() if seed is None else seed
        self.driver = SyncDriver(ctx, self.fed_args, timeout, update_transforms)
        self.total_steps = 0
        self.history: list[SyncRecord] = []
        self._reset_round(0)

    @property
    def access(self) -> ParamAccess | None:
        return self.driver.access

    @property
    def schedule(self) -> tuple[int, ...]:
        return self.driver.schedule

    @property
    def syncs(self) -> int:
        return len(self.history)

    @property
    def rounds(self) -> int:
        return self.driver.rounds

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.history]

    def due(self, global_step: int) -> bool:
        """Whether a sync happens at the end of the batch that brought the run to ``global_step``."""
        if global_step <= self._last_step:  # no optimizer step since (gradient accumulation)
            return False
        return self.driver.due(global_step)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.driver.enter_turn(self.seed)
            params = sum(p.numel() for p in pl_module.parameters())
            at_once = parties_at_once(self.ctx)
            count = choose_threads(params, trainer.strategy.root_device, at_once, self.threads)
            self._threads = PartyThreads(count, getattr(self.ctx, "name", "party"))
            self._threads.__enter__()  # left in close(), whichever hook ends the run

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here (not in setup) the strategy has wrapped the model, built the optimizers and the dataloaders
        total, steps_per_epoch = self._plan(trainer)
        access = lightning_access(trainer, pl_module, self.select)
        ranks = Ranks.of(trainer.world_size, trainer.is_global_zero, trainer.strategy.root_device)
        self.driver.start(access, ranks, total, steps_per_epoch, trainer.global_step, self.seed)
        self._reset_round(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.driver.ended:
            return
        examples = self.batch_size_fn(batch)
        self._examples += examples
        loss = batch_loss(outputs)
        if loss is not None:
            self._loss_sum += loss * examples
            self._loss_examples += examples
        if self.due(trainer.global_step):
            self._sync(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.driver.ended and self.access is not None:
            log.warning(
                "%s: training stopped after %d of %d syncs (early stopping, max_time?); the party leaves the "
                "session, which goes on without it only if the arbiter's min_parties allows",
                getattr(self.ctx, "name", "party"),
                self.syncs,
                self.rounds,
            )
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()  # leave the session instead of leaving the others waiting on a dead stream

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        self.driver.close()
        self._threads.__exit__(None, None, None)

    # -- internals -----------------------------------------------------------------------------------
    def _plan(self, trainer: pl.Trainer) -> tuple[int, int]:
        """The run's optimizer steps and the steps per epoch."""
        total = trainer.estimated_stepping_batches
        batches = trainer.num_training_batches
        if not math.isfinite(total):
            raise ConfigError(
                "a federated run needs a known length: give the Trainer max_epochs or max_steps (every party "
                "tells the arbiter how many times it will sync)"
            )
        if not math.isfinite(batches) and self.fed_args.aggregate_strategy == "epoch":
            raise ConfigError(
                "aggregate_strategy='epoch' needs a train dataloader with a length; for an iterable dataset "
                "use FedArguments('step', N) and the Trainer's max_steps"
            )
        accumulate = max(1, trainer.accumulate_grad_batches)
        steps_per_epoch = max(1, math.ceil(batches / accumulate)) if math.isfinite(batches) else int(total)
        self.total_steps = int(total)
        return self.total_steps, steps_per_epoch

    def _sync(self, trainer: pl.Trainer) -> None:
        examples, loss_sum, loss_examples = self._party_totals(trainer)
        round_loss = loss_sum / loss_examples if loss_examples else float("nan")
        train_seconds = time.perf_counter() - self._round_started
        stats = TrainStats(samples=examples, loss=round_loss if loss_examples else None)
        weight = float(max(1.0, examples))
        started = time.perf_counter()
        going = self.driver.sync(weight, stats)
        seconds = time.perf_counter() - started
        nbytes = self.access.params.spec.nbytes
        previous = self.history[-1].bytes_exchanged if self.history else 0
        record = SyncRecord(
            sync=self.syncs + 1,
            step=trainer.global_step,
            weight=weight,
            round_train_loss=round_loss,
            bytes_exchanged=previous + 2 * nbytes,  # the update sent and the aggregate received
            sync_seconds=seconds,
            samples_per_sec=examples / train_seconds if train_seconds > 0 else float("nan"),
        )
        self.history.append(record)
        for logger in trainer.loggers:  # directly: self.log would hold them back to every log_every_n_steps
            logger.log_metrics(record.metrics(), step=trainer.global_step)
        self._reset_round(trainer.global_step)
        if not going and trainer.global_step < self.total_steps:
            log.warning(
                "the arbiter ended the session at step %d of %d; training stops", trainer.global_step, self.total_steps
            )
            trainer.should_stop = True

    def _party_totals(self, trainer: pl.Trainer) -> tuple[float, float, float]:
        """Examples and loss since the last sync, summed over the party's ranks (they may see unequal shares)."""
        totals = torch.tensor(
            [self._examples, self._loss_sum, self._loss_examples], dtype=torch.float64, device=_device(trainer)
        )
        self.driver.ranks.all_reduce(totals)
        examples, loss_sum, loss_examples = totals.tolist()
        return examples, loss_sum, loss_examples

    def _reset_round(self, step: int) -> None:
        self._last_step = step
        self._examples = 0
        self._loss_sum = 0.0
        self._loss_examples = 0
        self._round_started = time.perf_counter()


def _device(trainer: pl.Trainer) -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA ones: the strategy's device is the backend's
    return trainer.strategy.root_device
