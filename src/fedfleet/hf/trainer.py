"""FATE-LLM's FedAVGClient / FedAVGServer on fedfleet: a Hugging Face ``Trainer`` that syncs with the others.

Guest and host::

    ctx = create_context(("guest", "9999"), parties, session_id="s1", arbiter_address="arbiter:50051")
    trainer = FedAvgClient(ctx=ctx, model=model, fed_args=FedArguments("epoch", 1),
                           training_args=TrainingArguments(...), train_set=ds, tokenizer=tok)
    trainer.train()
    trainer.save_model("guest_model")

Arbiter (``fedfleet.sync.server``)::

    FedAvgServer(create_context(("arbiter", "10000"), parties, session_id="s1")).train()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

from fedfleet.errors import ConfigError
from fedfleet.hf import inprocess
from fedfleet.hf.callback import FedSyncCallback
from fedfleet.sync.args import FedArguments
from fedfleet.sync.threads import PartyThreads, check_threads, choose_threads, parties_at_once


class FedAvgClient(Trainer):
    """A data owner's ``Trainer``; everything but ``ctx``/``fed_args`` is the usual Trainer's.

    ``loss_fn(logits, labels)`` replaces the model's own loss when given. Only the trainable parameters
    (``requires_grad``: all of them in full fine-tuning, the adapters with PEFT) are exchanged; pass
    ``select`` (``"all"``, ``"re:<regex>"`` or a callable) to choose otherwise. ``sync_timeout``: seconds
    to wait for the other parties at a sync (None: the context's limit). ``update_transforms``: the aggregation
    pipeline's party-side chain (e.g. ``[ClipNorm(1.0)]`` from ``fedfleet.transforms``) on each update sent.
    ``threads``: torch's CPU threads while training (None: 1 for a model under 10M params, as the simulation
    trains, else torch's own, shared out among in-process parties that train at once; ``fedfleet.sync.threads``).
    A DeepSpeed config's numbers that disagree with ``training_args`` become ``"auto"``, with a warning
    (``fedfleet.hf.ds_config.reconcile``); parties sharing a process: ``fedfleet.hf.inprocess``.
    """

    def __init__(
        self,
        ctx: Any,
        model: nn.Module,
        fed_args: FedArguments | None = None,
        training_args: TrainingArguments | None = None,
        loss_fn: Callable[..., Any] | None = None,
        train_set: Any = None,
        eval_set: Any = None,
        tokenizer: Any = None,
        data_collator: Any = None,
        compute_metrics: Callable[..., dict] | None = None,
        callbacks: Sequence[Any] = (),
        select: Any = "trainable",
        sync_timeout: float | None = None,
        update_transforms: Sequence[Any] = (),
        val_set: Any = None,  # FATE-LLM's name for eval_set
        threads: int | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if val_set is not None:
            if eval_set is not None:
                raise ConfigError("give eval_set or val_set (FATE-LLM's name for it), not both")
            eval_set = val_set
        if getattr(ctx, "is_arbiter", False):
            raise ConfigError("this context is the arbiter's; data owners use FedAvgClient, the arbiter FedAvgServer")
        if train_set is None:
            raise ConfigError("FedAvgClient needs train_set: the party's own training data")
        _check_vocab(tokenizer, model)
        self.cpu_threads = check_threads(threads)  # a bad count fails here, not when training starts
        self.fed_args = fed_args or FedArguments()
        self.fed_sync = FedSyncCallback(ctx, self.fed_args, select, sync_timeout, update_transforms)
        self.fed_sync.driver.vocab = _vocab(tokenizer)  # the parties' token ids must mean the same (core.vocab)
        with inprocess.building(self, ctx, training_args):  # what one process cannot hold is refused first
            super().__init__(
                model=model,
                args=training_args,
                data_collator=data_collator,
                train_dataset=train_set,
                eval_dataset=eval_set,
                processing_class=tokenizer,
                compute_loss_func=_loss_adapter(loss_fn) if loss_fn is not None else None,
                compute_metrics=compute_metrics,
                callbacks=[*callbacks, self.fed_sync],
                **trainer_kwargs,
            )
        self.fed_sync.trainer = self
        self.ctx = ctx

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.fed_sync.count_examples(inputs)  # a sync's weight is the examples trained on since the last one
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.fed_sync.count_loss(loss)
        return loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            inprocess.check_going(self.ctx)
            with self.fed_sync.turn(self.args.seed), self._threads():
                return super().train(*args, **kwargs)
        except Exception as exc:
            inprocess.explain_failure(self.ctx, exc)  # raises the cause when another party's build was refused
            raise
        finally:
            self.fed_sync.close()  # also when training fails: leave the session instead of hanging it
            inprocess.release(self)

    def _threads(self) -> PartyThreads:
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: the full size
        count = choose_threads(params, self.args.device, parties_at_once(self.ctx), self.cpu_threads)
        return PartyThreads(count, getattr(self.ctx, "name", "party"))


def _vocab(tokenizer: Any) -> str:
    """The join's vocabulary fingerprint; '' for no tokenizer (or an image processor: nothing to compare)."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return ""
    from fedfleet.hf.data.tokenizer import vocab_fingerprint

    return vocab_fingerprint(tokenizer)


def _loss_adapter(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    def compute(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if labels is not None and labels.dtype.is_floating_point and labels.shape != logits.shape:
            labels = labels.reshape(logits.shape)
        return loss_fn(logits, labels)

    return compute


def _check_vocab(tokenizer: Any, model: nn.Module) -> None:
    if tokenizer is None or not hasattr(model, "get_input_embeddings"):
        return
    from fedfleet.hf.data.tokenizer import check_vocab

    check_vocab(tokenizer, model)
