"""What a data owner's Trainer takes from the user's sub-model class beyond its weights: ``forward``,
``parameters()`` and ``partial_weight_decay`` (FATE-LLM's), honoured by ``OffsiteTuningClient``.

The Trainer trains ``sub.model`` (the Hugging Face model, or its PEFT wrapper under LoRA): saving, column removal
and DeepSpeed all expect that model. What the class adds is routed in at two points:

- **forward**: a class that overrides ``forward`` (FATE's ``forward(self, x): return self.model(**x)``) is what
  each training step calls; while it runs, its ``self.model`` is the model the Trainer would have called (the
  DeepSpeed engine, the DDP wrapper or the PEFT model), so gradients and hooks are the Trainer's own.
- **the optimizer**: a ``parameters()`` override that returns parameter groups (FATE's sub models do, when
  ``partial_weight_decay`` is a float) becomes the optimizer's groups, frozen tensors left out; a
  ``partial_weight_decay`` without such an override decays the adapters' weights at that rate and leaves biases
  and norm weights undecayed (the Trainer's own rule for which is which).

What cannot be honoured is refused before the hand-out, naming what to change.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from fedfleet.errors import ConfigError
from fedfleet.offsite.models import OffsiteTuningSubModel, _OffsiteTuningModel

Groups = list[dict[str, Any]]
Route = Callable[[nn.Module, dict[str, Any]], Any]  # (the model the Trainer would call, the batch) -> outputs


def overrides(sub: nn.Module, method: str) -> bool:
    """Whether the user's class defines ``method`` itself (fedfleet's and torch's own do not count)."""
    return getattr(type(sub), method) not in (getattr(_OffsiteTuningModel, method), getattr(nn.Module, method))


def forward_route(sub: OffsiteTuningSubModel) -> Route | None:
    """``call(model, inputs)`` running the class's own ``forward`` with ``model`` as its ``self.model``; None when
    the class keeps fedfleet's forward (which is ``self.model(**inputs)``: the Trainer's call already)."""
    if not overrides(sub, "forward"):
        return None
    params = list(inspect.signature(sub.forward).parameters.values())
    # forward(self, x): FATE's form, the batch as one dict; any other signature takes the batch as keywords
    as_dict = len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)

    def call(model: nn.Module, inputs: dict[str, Any]) -> Any:
        own = sub._modules["model"]
        sub._modules["model"] = model  # not setattr: no module is re-registered, only looked up
        try:
            return sub(inputs) if as_dict else sub(**inputs)
        finally:
            sub._modules["model"] = own

    return call


class RoutedModel:
    """What ``Trainer.compute_loss`` calls in place of ``model``: ``model(**inputs)`` runs the class's forward;
    every attribute is the model's (the Trainer may ask it for its name or config)."""

    def __init__(self, model: nn.Module, call: Route) -> None:
        self._model, self._call = model, call

    def __call__(self, **inputs: Any) -> Any:
        return self._call(self._model, inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def own_groups(sub: OffsiteTuningSubModel, lora: Any, training_args: Any) -> Groups | None:
    """The optimizer groups the class asks for through a ``parameters()`` override (trainable tensors only), or
    None when it asks for none. Checked now, before the hand-out: a refusal after it would leave the owner waiting."""
    if not overrides(sub, "parameters"):
        return None
    given = list(sub.parameters())
    if not given or not all(isinstance(g, Mapping) for g in given):
        if all(isinstance(p, Tensor) for p in given):
            return _as_one_group(sub, given)
        raise ConfigError(f"{type(sub).__name__}.parameters() must give tensors or parameter groups (dicts)")
    if lora is not None:
        raise ConfigError(
            f"{type(sub).__name__}.parameters() gives parameter groups of the adapters' own weights, which LoRA "
            f"freezes (only its factors train); drop lora, or use partial_weight_decay=None and "
            f"TrainingArguments(weight_decay=...)"
        )
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in given if "params" in g]
    groups = [g for g in groups if g["params"]]
    _check_cover(sub, groups)
    _check_deepspeed(training_args, f"{type(sub).__name__}.parameters()")
    return groups


def _as_one_group(sub: OffsiteTuningSubModel, given: list[Tensor]) -> Groups | None:
    trainable = [p for p in sub.model.parameters() if p.requires_grad]
    chosen = [p for p in given if p.requires_grad]
    if {id(p) for p in chosen} == {id(p) for p in trainable}:
        return None  # every trainable tensor: the Trainer's own optimizer is what was asked for
    if not chosen:
        raise ConfigError(f"{type(sub).__name__}.parameters() gives no trainable tensor (only the adapters train)")
    return [{"params": chosen}]


def _check_cover(sub: OffsiteTuningSubModel, groups: Groups) -> None:
    covered = {id(p) for g in groups for p in g["params"]}
    if not covered:
        raise ConfigError(f"{type(sub).__name__}.parameters() gives groups without a trainable tensor")
    left = [n for n, p in sub.model.named_parameters() if p.requires_grad and id(p) not in covered]
    if left:  # they would get gradients and be synced, but never move
        raise ConfigError(
            f"{type(sub).__name__}.parameters() leaves {len(left)} trainable tensor(s) out of every group "
            f"(first: {left[0]}); give every adapter tensor a group"
        )


def decay_rate(sub: OffsiteTuningSubModel, lora: Any, training_args: Any) -> float | None:
    """The class's ``partial_weight_decay``, checked; None when it has none (or a ``parameters()`` override,
    which then decides the groups itself)."""
    rate = getattr(sub, "partial_weight_decay", None)
    if rate is None or overrides(sub, "parameters"):
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
        raise ConfigError(f"partial_weight_decay must be None or a number >= 0, got {rate!r}")
    have = getattr(training_args, "weight_decay", 0.0) or 0.0
    if have and have != rate:
        raise ConfigError(
            f"partial_weight_decay={rate} and TrainingArguments(weight_decay={have}) both set the decay; give one"
        )
    _check_deepspeed(training_args, "partial_weight_decay")
    return float(rate)


def _check_deepspeed(training_args: Any, what: str) -> None:
    """A DeepSpeed config with its own optimizer builds it from that config alone: groups would be dropped."""
    config = getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)
    if config is None:
        config = getattr(training_args, "deepspeed", None)
        if isinstance(config, str):
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
    if isinstance(config, Mapping) and "optimizer" in config:
        raise ConfigError(
            f"{what} sets optimizer groups, but the DeepSpeed config has an 'optimizer' section, which builds the "
            f"optimizer without them; remove that section (the Trainer's optimizer then runs under DeepSpeed)"
        )
