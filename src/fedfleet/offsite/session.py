"""The deployed protocol: the model owner is the arbiter; data owners never receive the full model.

1. **Hand-out** (session ``<id>/handout``, at ``handout_address``, by default the arbiter's port + 1): the owner
   sends every data owner the sub-model weights (adapters + emulator + extras) once, as one flat param set whose
   layout the owner fixes; a data owner whose sub model has another layout is refused at join.
2. **Tuning** (session ``<id>``, at the arbiter's address): data owners train the adapters (or LoRA on them) with
   ``FedAvgClient``; the owner starts the session from its own trainable params (no data owner can impose a
   start) and FedAvg-aggregates them at every sync (``aggregate_model=True``).
3. **Plug-in**: the owner loads the final aggregate into its own copy of the sub model (merging LoRA) and copies
   the tuned adapters into the full model.

Two sessions on two ports rather than one: a party's param layout is fixed per session, and the hand-out (the
whole sub model, frozen parts included) and the syncs (the trainable tensors only) have different layouts; the
frozen emulator never travels again after the hand-out.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import torch
from torch import nn

from fedfleet.core.loop import RoundRecord
from fedfleet.core.params import FlatParams
from fedfleet.errors import ConfigError
from fedfleet.hf.trainer import FedAvgClient
from fedfleet.offsite.data import check_causal_batches
from fedfleet.offsite.extract import load_section_state
from fedfleet.offsite.models import AutoSubModel, OffsiteTuningMainModel, OffsiteTuningSubModel
from fedfleet.offsite.plan import ADAPTERS
from fedfleet.offsite.tuning import LoraSettings, merge_lora, tunable
from fedfleet.offsite.wrapper import Groups, Route, RoutedModel, decay_rate, forward_route, own_groups
from fedfleet.runtime.grpc.settings import DEFAULTS
from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from fedfleet.sync.args import FedArguments
from fedfleet.sync.context import Context

log = logging.getLogger("fedfleet.offsite")


def handout_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + 1}"


def handout_session(session_id: str) -> str:
    return f"{session_id}/handout"


def trainable_params(model: nn.Module) -> FlatParams:
    return FlatParams.from_tensors({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})


class OffsiteTuningServer:
    """The model owner: ``OffsiteTuningServer(ctx, main).train()`` hands out, runs the rounds, plugs in.

    The main model is all it needs, as in FATE-LLM: it hands out what ``main.get_submodel_weights()`` gives
    (adapters, emulator and the class's own extras, however it shares them) and keeps a skeleton of the sub
    model holding only the adapters, for the layout the data owners train and the aggregate to plug in. The
    skeleton is built from the main model's config; ``sub=`` gives one where that cannot be done (a model
    without a Hugging Face config, or whose family is not registered). Its extras are never read here.
    """

    def __init__(
        self,
        ctx: Context,
        main: OffsiteTuningMainModel | None = None,
        sub: OffsiteTuningSubModel | None = None,
        lora: LoraSettings | None = None,
        fed_args: FedArguments | None = None,
        rounds: int | None = None,
        handout_at: str | None = None,
        wait_timeout: float = DEFAULTS.wait_timeout,
        *,
        model: OffsiteTuningMainModel | None = None,
        aggregate_model: bool = True,
    ) -> None:
        main = _fate_model("main", main, model, aggregate_model)
        if not ctx.is_arbiter:
            raise ConfigError(f"OffsiteTuningServer runs on the model owner (the arbiter); this is {ctx.name}")
        self.ctx, self.main, self.lora = ctx, main, lora
        self.fed_args = fed_args or FedArguments()
        self.rounds = rounds
        self.handout_at = handout_at or handout_address(ctx.arbiter_address)
        self.wait_timeout = wait_timeout
        self.handout = FlatParams.from_tensors(main.get_submodel_weights())
        self.sub = sub if sub is not None else _skeleton(main)
        # only the adapters: the skeleton never runs, and the class's extras may be shared in pieces only the data
        # owners' own class can join (FATE's wte0 .. wte9)
        load_section_state(self.sub.blocks, {k: self.sub.layers[k] for k in ADAPTERS}, self.handout.tensors())
        self.tuned = tunable(self.sub, lora)  # the owner's mirror of what data owners train
        self.arbiter: SyncArbiter | None = None

    def train(self) -> list[RoundRecord]:
        common = dict(parties=self.ctx.data_parties, certs=self.ctx.certs, wait_timeout=self.wait_timeout)
        handout = SyncArbiter(
            SyncSessionConfig(
                session=handout_session(self.ctx.session_id), address=self.handout_at, initial=self.handout, **common
            )
        )
        errors: list[BaseException] = []
        thread = threading.Thread(target=_capture(handout.distribute, errors), name="handout", daemon=True)
        thread.start()
        log.info("handing out %d tensors (%.1f MB) of the sub model", len(self.handout.spec), self.handout.nbytes / 1e6)
        self.arbiter = SyncArbiter(
            SyncSessionConfig(
                session=self.ctx.session_id,
                address=self.ctx.arbiter_address,
                rounds=self.rounds,
                initial=trainable_params(self.tuned),
                **common,
            )
        )
        try:
            history = self.arbiter.serve()
        except BaseException:
            thread.join(timeout=2.0)
            if errors:  # the hand-out failed first (a data owner never came): that is why the tuning did
                raise errors[0] from None
            raise
        thread.join()
        if errors:
            raise errors[0]
        self.plug_in(self.arbiter.loop.global_params)
        return history

    def plug_in(self, final: FlatParams) -> None:
        """Final aggregate -> the owner's sub model (LoRA merged) -> adapters of the full model."""
        params = dict(self.tuned.named_parameters())
        with torch.no_grad():
            for name, t in final.tensors().items():
                params[name].copy_(t)
        merge_lora(self.tuned)
        self.main.load_submodel_weights(self.sub.get_submodel_weights())


def _skeleton(main: OffsiteTuningMainModel) -> OffsiteTuningSubModel:
    p = main.plan
    try:
        return AutoSubModel(main.model, p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num)
    except ConfigError as exc:
        raise ConfigError(
            f"the owner builds the data owners' sub model from the main model's config to learn the layout they "
            f"train, and cannot for this {type(main.model).__name__}: {exc}. Give OffsiteTuningServer(..., "
            f"sub=<your sub model>): only its adapters' layout is used"
        ) from None


def receive_submodel(
    ctx: Context, sub: OffsiteTuningSubModel, handout_at: str | None = None, timeout: float | None = 3600.0
) -> FlatParams:
    """A data owner's hand-out: the owner's adapters, emulator and extras, loaded into ``sub``; returns them."""
    where = handout_at or handout_address(ctx.arbiter_address)
    hctx = dataclasses.replace(ctx, session_id=handout_session(ctx.session_id), arbiter_address=where)
    received = FlatParams.from_tensors(sub.get_submodel_weights())  # the layout; the values are overwritten
    party = hctx.channel(received.spec, rounds=0)
    party.fetch(received, timeout)
    sub.load_submodel_weights(received.tensors())
    return received


def _fate_model(name: str, ours: Any, fates: Any, aggregate_model: Any) -> Any:
    """The model given as fedfleet's ``main=``/``sub=`` or FATE-LLM's ``model=``, and FATE's ``aggregate_model``
    (fedfleet always averages the adapters; FATE's False, local tuning only, is refused at once)."""
    if aggregate_model is not True:
        raise ConfigError(
            f"aggregate_model={aggregate_model!r}: fedfleet's Offsite-Tuning always averages the data owners' "
            f"adapters (FATE's aggregate_model=True); for tuning without the others, run one data owner alone"
        )
    if ours is not None and fates is not None:
        raise ConfigError(f"give {name}= or model= (FATE-LLM's name for it), not both")
    model = ours if ours is not None else fates
    if model is None:
        raise ConfigError(f"give the {name} model: {name}= (FATE-LLM: model=)")
    return model


class OffsiteTuningClient(FedAvgClient):
    """A data owner: receives the sub model, then trains its adapters (``lora``: LoRA on them) as a
    ``FedAvgClient``; every other argument is FedAvgClient's (``training_args``, ``train_set``, ...).

    The sub model's class is honoured (``fedfleet.offsite.wrapper``): its own ``forward`` is what each step
    calls, a ``parameters()`` override's groups or its ``partial_weight_decay`` shape the optimizer.
    ``handout=False``: ``sub`` already holds the owner's weights (in-process runs, ``LocalFederation``)."""

    def __init__(
        self,
        ctx: Context,
        sub: OffsiteTuningSubModel | None = None,
        lora: LoraSettings | None = None,
        handout_at: str | None = None,
        handout: bool = True,
        **client_kwargs: Any,
    ) -> None:
        # FATE-LLM's keywords and the class's wishes, checked before the hand-out: an error after it would leave
        # the owner waiting
        sub = _fate_model("sub", sub, client_kwargs.pop("model", None), client_kwargs.pop("aggregate_model", True))
        if getattr(ctx, "is_arbiter", False):
            raise ConfigError("the arbiter is the model owner: use OffsiteTuningServer there")
        self._groups, self._decay, self._route = check_data_owner(sub, lora, client_kwargs)
        self.sub = sub
        self.received = receive_submodel(ctx, sub, handout_at) if handout else None
        super().__init__(ctx=ctx, model=tunable(sub, lora), **client_kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._route is not None:
            model = RoutedModel(model, self._route)  # type: ignore[assignment]
        return super().compute_loss(model, inputs, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or (self._groups is None and self._decay is None):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = self._groups if self._groups is not None else self._decay_groups(opt_model)
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or kwargs.keys() & _OWN_GROUPS:
            raise ConfigError(
                f"optim={self.args.optim!r} makes its own parameter groups, so the sub model's (parameters() or "
                f"partial_weight_decay) cannot be kept; use a plain torch optimizer (e.g. adamw_torch)"
            )
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _decay_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        decay = set(self.get_decay_parameter_names(model))  # the Trainer's rule: no biases, no norm weights
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in trainable if n in decay], "weight_decay": self._decay},
            {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
        ]


def check_data_owner(
    sub: OffsiteTuningSubModel, lora: LoraSettings | None, client_kwargs: dict[str, Any]
) -> tuple[Groups | None, float | None, Route | None]:
    """What ``OffsiteTuningClient`` checks before its hand-out (``fedfleet offsite --dry-run`` too): the class's
    optimizer groups, its ``partial_weight_decay`` and ``forward`` (returned: groups, decay rate, forward route),
    and that the collator feeds the causal LM."""
    args = client_kwargs.get("training_args")
    checked = own_groups(sub, lora, args), decay_rate(sub, lora, args), forward_route(sub)
    check_causal_batches(client_kwargs.get("data_collator"), client_kwargs.get("train_set"))
    return checked


_OWN_GROUPS = {"params", "model", "optimizer_dict"}  # optimizer kwargs that replace the groups (GaLore, LOMO ...)


def _capture(fn: Any, errors: list[BaseException]) -> Any:
    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    return run
