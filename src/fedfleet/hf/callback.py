"""The sync points of a Hugging Face training run: a ``TrainerCallback`` that FedAvgClient installs.

At the start of training every party loads the session's initial params (the first party's), so all
train the same model. Every ``interval`` optimizer steps (an epoch, N steps or a fraction of the run) and
at the last step, the party sends its trainable params and waits for the weighted mean, which then
continues training with the same optimizer state and learning-rate schedule. With several ranks
(torchrun, deepspeed) only rank 0 talks to the arbiter and broadcasts the result.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fedfleet.hf.args import FedArguments
from fedfleet.hf.exchange import ParamAccess, param_access

log = logging.getLogger("fedfleet.hf")


class FedSyncCallback(TrainerCallback):
    def __init__(self, ctx: Any, fed_args: FedArguments, select: Any = "trainable") -> None:
        self.ctx = ctx
        self.fed_args = fed_args
        self.select = select
        self.trainer: Any = None  # set by FedAvgClient
        self.access: ParamAccess | None = None
        self.channel: Any = None
        self.interval = 1
        self.rounds = 0
        self.syncs = 0
        self.weights: list[float] = []  # the weight of each sync (examples trained on)
        self.sync_seconds = 0.0  # time spent in syncs (waiting for the others included)
        self._last_step = 0
        self._examples = 0  # trained on since the last sync, by this rank
        self._ended = False

    def count_examples(self, inputs: dict[str, Any]) -> None:
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        self._examples += int(first.shape[0]) if first is not None else 1

    # -- HF hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        model = self.trainer.model
        self.access = param_access(self.trainer, model, self.select)
        epochs = max(1, math.ceil(state.num_train_epochs))
        steps_per_epoch = _steps_per_epoch(args, len(self.trainer.train_dataset))
        self.interval = self.fed_args.interval(epochs, state.max_steps, steps_per_epoch)
        self.rounds = self.fed_args.rounds(epochs, state.max_steps, steps_per_epoch)
        self._last_step = state.global_step
        spec = self.access.params.spec
        log.info(
            "%s: %d syncs of %d tensors (%.1f MB), every %d steps",
            getattr(self.ctx, "name", "party"),
            self.rounds,
            len(spec),
            spec.nbytes / 1e6,
            self.interval,
        )
        if _is_main(args):
            self.channel = self.ctx.channel(spec, self.rounds)
        self._exchange(args, lambda: self.channel.start(self.access.params))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self._ended:
            return
        step = state.global_step
        if (step - self._last_step) < self.interval and step < state.max_steps:
            return
        weight = float(max(1, self._examples) * _world(args))  # ranks see equal shares of the data
        metrics = _recent_loss(state)
        self.weights.append(weight)
        going = self._exchange(args, lambda: self.channel.sync(self.access.params, weight, metrics))
        self._last_step, self._examples = step, 0
        self.syncs += 1
        if not going:
            self._ended = True
            if step < state.max_steps:
                log.warning("the arbiter ended the session at step %d of %d; training stops", step, state.max_steps)
                control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    # -- internals -----------------------------------------------------------------------------------
    def _exchange(self, args: TrainingArguments, talk: Any) -> bool:
        """gather on every rank, talk to the arbiter on rank 0, broadcast, scatter on every rank."""
        start = time.perf_counter()
        self.access.gather()
        going = talk() if _is_main(args) else True
        if _world(args) > 1:
            flag = torch.tensor([1 if going else 0], device=self.access.params.device)
            torch.distributed.broadcast(flag, src=0)
            for buf in self.access.params.buffers.values():
                torch.distributed.broadcast(buf, src=0)
            going = bool(flag.item())
        self.access.scatter()
        self.sync_seconds += time.perf_counter() - start
        return going


def _is_main(args: TrainingArguments) -> bool:
    return args.process_index == 0


def _world(args: TrainingArguments) -> int:
    return args.world_size if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def _steps_per_epoch(args: TrainingArguments, examples: int) -> int:
    per_step = args.per_device_train_batch_size * max(1, args.world_size)
    batches = examples // per_step if args.dataloader_drop_last else math.ceil(examples / per_step)
    return max(1, batches // args.gradient_accumulation_steps)


def _recent_loss(state: TrainerState) -> dict[str, float]:
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return {"loss": float(entry["loss"])}
    return {}
