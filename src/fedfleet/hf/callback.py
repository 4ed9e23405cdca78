"""The sync points of a Hugging Face training run: a ``TrainerCallback`` that FedAvgClient installs.

At the start of training every party loads the session's initial params (the first party's), so all
train the same model. After every ``aggregate_freq`` of the run (N epochs, N optimizer steps or a
fraction) and at the last step, the party sends its trainable params (with its mean training loss since
the last sync) and waits for the weighted mean, which then continues training with the same optimizer
state and learning-rate schedule. With several ranks (torchrun, deepspeed) only rank 0 talks to the
arbiter and broadcasts the result; the exchange itself is ``fedfleet.sync.driver``'s, shared with Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fedfleet.core.update import TrainStats
from fedfleet.sync.access import ParamAccess, param_access
from fedfleet.sync.args import FedArguments
from fedfleet.sync.driver import Ranks, SyncDriver

log = logging.getLogger("fedfleet.hf")


class FedSyncCallback(TrainerCallback):
    """The Trainer's side of the sync driver: counts each round's examples and loss and says where the
    params live. ``timeout``: seconds to wait for the others at a sync (None: the context's own limit)."""

    def __init__(
        self,
        ctx: Any,
        fed_args: FedArguments,
        select: Any = "trainable",
        timeout: float | None = None,
        update_transforms: Sequence[Any] = (),
    ) -> None:
        self.ctx = ctx
        self.fed_args = fed_args
        self.select = select
        self.driver = SyncDriver(ctx, fed_args, timeout, update_transforms)
        self.trainer: Any = None  # set by FedAvgClient
        self.weights: list[float] = []  # the weight of each sync (examples trained on)
        self.losses: list[float] = []  # the mean training loss this rank reported at each sync
        self.sync_seconds = 0.0  # time spent in syncs, waiting for the others included (not the start)
        self._last_step = 0
        self._examples = 0  # trained on since the last sync, by this rank
        self._loss_sum: torch.Tensor | float = 0.0  # a tensor: no device sync per step, only at a sync

    @property
    def access(self) -> ParamAccess | None:
        return self.driver.access

    @property
    def syncs(self) -> int:
        return self.driver.syncs

    @property
    def rounds(self) -> int:
        return self.driver.rounds

    @property
    def schedule(self) -> tuple[int, ...]:
        return self.driver.schedule

    def due(self, step: int) -> bool:
        """Whether the party syncs at the end of optimizer step ``step``."""
        return self.driver.due(step)

    def count_examples(self, inputs: dict[str, Any]) -> None:
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        self._examples += int(first.shape[0]) if first is not None else 1

    def count_loss(self, loss: Any) -> None:
        """``training_step``'s loss (already divided by the gradient-accumulation steps)."""
        if isinstance(loss, torch.Tensor):
            self._loss_sum = self._loss_sum + loss.detach().float()

    @contextlib.contextmanager
    def turn(self, seed: int) -> Iterator[None]:
        """Held around the whole run: in-process parties train in turns with their own random-number state
        (the context's ``turn``), so a seeded run repeats; nothing for networked parties."""
        self.driver.enter_turn(seed)
        try:
            yield
        finally:
            self.driver.leave_turn()

    # -- HF hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        access = param_access(self.trainer, self.trainer.model, self.select)
        ranks = Ranks.of(args.world_size, args.process_index == 0, access.params.device)
        steps_per_epoch = _steps_per_epoch(args, len(self.trainer.train_dataset))
        self.driver.start(access, ranks, state.max_steps, steps_per_epoch, state.global_step, args.seed)
        self._last_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        step = state.global_step
        if not self.due(step):
            return
        weight = float(max(1, self._examples) * self.driver.ranks.world)  # ranks see equal shares of the data
        loss = self._round_loss(step)
        self.weights.append(weight)
        self.losses.append(math.nan if loss is None else loss)
        started = time.perf_counter()
        going = self.driver.sync(weight, TrainStats(loss=loss))
        self.sync_seconds += time.perf_counter() - started
        self._last_step, self._examples, self._loss_sum = step, 0, 0.0
        if not going and step < state.max_steps:
            log.warning("the arbiter ended the session at step %d of %d; training stops", step, state.max_steps)
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.close()

    def close(self) -> None:
        self.driver.close()

    # -- internals -----------------------------------------------------------------------------------
    def _round_loss(self, step: int) -> float | None:
        """This rank's mean loss per optimizer step since the last sync (what the arbiter's table shows)."""
        steps = step - self._last_step
        if not isinstance(self._loss_sum, torch.Tensor) or steps < 1:
            return None
        return float(self._loss_sum.item()) / steps


def _steps_per_epoch(args: TrainingArguments, examples: int) -> int:
    per_step = args.per_device_train_batch_size * max(1, args.world_size)
    batches = examples // per_step if args.dataloader_drop_last else math.ceil(examples / per_step)
    return max(1, batches // args.gradient_accumulation_steps)
