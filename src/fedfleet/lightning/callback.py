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

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from fedfleet.core.params import Selector
from fedfleet.errors import ConfigError
from fedfleet.lightning.access import lightning_access
from fedfleet.lightning.batches import batch_loss, batch_size
from fedfleet.lightning.records import SyncRecord
from fedfleet.sync.access import ParamAccess
from fedfleet.sync.args import FedArguments, steps_text

log = logging.getLogger("fedfleet.lightning")

_GOING, _ENDED, _FAILED = 1, 0, -1  # what rank 0 broadcasts after talking to the arbiter


class FedLightningCallback(pl.Callback):
    """Makes ``trainer.fit`` a federated party of the session ``ctx`` (gRPC or a ``LocalFederation``).

    ``select``: which params travel (``"trainable"``: those with ``requires_grad``; ``"all"``,
    ``"re:<regex>"`` or a callable). ``batch_size_fn(batch) -> int`` counts a batch's examples when its
    first tensor's leading dimension is not that. ``timeout``: seconds to wait for the others at a sync.
    ``seed``: in-process parties only, the seed of this party's random state while it takes its turns.
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
    ) -> None:
        if getattr(ctx, "is_arbiter", False):
            raise ConfigError("this context is the arbiter's: it does not train; run FedAvgServer(ctx).train() there")
        self.ctx = ctx
        self.fed_args = fed_args or FedArguments()
        self.select = select
        self.batch_size_fn = batch_size_fn or batch_size
        self.timeout = timeout
        # in-process parties (a LocalFederation) train in turns from ``setup`` on, each with its own random
        # state seeded from this (default: torch's seed when the callback is made, e.g. seed_everything's)
        self.seed = torch.initial_seed() if seed is None else seed
        self._turn: Any = None
        self.access: ParamAccess | None = None
        self.channel: Any = None
        self.schedule: tuple[int, ...] = ()  # the optimizer steps after which this party syncs
        self.total_steps = 0
        self.history: list[SyncRecord] = []
        self._ended = False
        self._reset_round(0)

    @property
    def syncs(self) -> int:
        return len(self.history)

    @property
    def rounds(self) -> int:
        return len(self.schedule)

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.history]

    def due(self, global_step: int) -> bool:
        """Whether a sync happens at the end of the batch that brought the run to ``global_step``."""
        if self._ended or global_step <= self._last_step:  # no optimizer step since (gradient accumulation)
            return False
        return self.syncs < len(self.schedule) and global_step >= self.schedule[self.syncs]

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        make = getattr(self.ctx, "turn", None)
        if stage == "fit" and make is not None and self._turn is None:
            self._turn = make(self.seed)
            if self._turn is not None:
                self._turn.__enter__()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here (not in setup) the strategy has wrapped the model, built the optimizers and the dataloaders
        self._plan(trainer)
        self.access = lightning_access(trainer, pl_module, self.select)
        spec = self.access.params.spec
        log.info(
            "%s: %d syncs of %d tensors (%.2f MB), after optimizer steps %s",
            getattr(self.ctx, "name", "party"),
            self.rounds,
            len(spec),
            spec.nbytes / 1e6,
            steps_text(self.schedule),
        )
        if trainer.is_global_zero:
            self.channel = self.ctx.channel(spec, self.rounds)
        self._exchange(trainer, lambda: self.channel.start(self.access.params, self.timeout))
        self._reset_round(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._ended:
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
        if not self._ended and self.access is not None:
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
        if self.channel is not None:
            channel, self.channel = self.channel, None
            channel.close()
        if self._turn is not None:  # let the other in-process parties finish
            turn, self._turn = self._turn, None
            turn.__exit__(None, None, None)

    # -- internals -----------------------------------------------------------------------------------
    def _plan(self, trainer: pl.Trainer) -> None:
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
        self.schedule = self.fed_args.sync_steps(self.total_steps, steps_per_epoch, start=trainer.global_step)

    def _sync(self, trainer: pl.Trainer) -> None:
        examples, loss_sum, loss_examples = self._party_totals(trainer)
        round_loss = loss_sum / loss_examples if loss_examples else float("nan")
        train_seconds = time.perf_counter() - self._round_started
        metrics = {"loss": round_loss} if loss_examples else {}
        weight = float(max(1.0, examples))
        started = time.perf_counter()
        going = self._exchange(trainer, lambda: self.channel.sync(self.access.params, weight, metrics, self.timeout))
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
        if not going:
            self._ended = True
            if trainer.global_step < self.total_steps:
                log.warning(
                    "the arbiter ended the session at step %d of %d; training stops",
                    trainer.global_step,
                    self.total_steps,
                )
                trainer.should_stop = True

    def _party_totals(self, trainer: pl.Trainer) -> tuple[float, float, float]:
        """Examples and loss since the last sync, summed over the party's ranks (they may see unequal shares)."""
        totals = torch.tensor(
            [self._examples, self._loss_sum, self._loss_examples], dtype=torch.float64, device=_device(trainer)
        )
        if _world(trainer) > 1:
            dist.all_reduce(totals)
        examples, loss_sum, loss_examples = totals.tolist()
        return examples, loss_sum, loss_examples

    def _exchange(self, trainer: pl.Trainer, talk: Callable[[], Any]) -> bool:
        """Gather on every rank, talk to the arbiter on rank 0, broadcast, scatter on every rank."""
        self.access.gather()
        state, error = _GOING, None
        if trainer.is_global_zero:
            try:
                with self._turn.released() if self._turn is not None else contextlib.nullcontext():
                    state = _GOING if talk() is not False else _ENDED
            except BaseException as exc:  # tell the other ranks before raising, or they wait in broadcast
                state, error = _FAILED, exc
        if _world(trainer) > 1:
            flag = torch.tensor([state], device=_device(trainer))
            dist.broadcast(flag, src=0)
            state = int(flag.item())
            if state != _FAILED:
                for buf in self.access.params.buffers.values():
                    dist.broadcast(buf, src=0)
        if error is not None:
            raise error
        if state == _FAILED:
            raise RuntimeError("rank 0 failed to sync with the arbiter (its own error says why)")
        self.access.scatter()
        return state == _GOING

    def _reset_round(self, step: int) -> None:
        self._last_step = step
        self._examples = 0
        self._loss_sum = 0.0
        self._loss_examples = 0
        self._round_started = time.perf_counter()


def _world(trainer: pl.Trainer) -> int:
    return trainer.world_size if dist.is_available() and dist.is_initialized() else 1


def _device(trainer: pl.Trainer) -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA ones: the strategy's device is the backend's
    return trainer.strategy.root_device
