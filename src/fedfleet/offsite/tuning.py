"""What a data owner trains: the sub model's adapters, in full or through LoRA (the paper's best setting).

The sub model's emulator and extras never require grad, so the HF Trainer builds its optimizer over the adapters
only (no weight decay or momentum can touch the frozen tensors) and ``FedAvgClient`` syncs exactly the trainable
tensors: ``aggregate_model=True`` is FedAvg over the adapters (or their LoRA factors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedfleet.errors import ConfigError
from fedfleet.offsite.families import family_of
from fedfleet.offsite.models import OffsiteTuningSubModel
from fedfleet.offsite.plan import ADAPTERS


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the adapter blocks' linear layers (the family table names them). ``seed`` fixes the A factors, so
    the owner and every data owner build the same LoRA layout and start."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r must be >= 1, got {self.r}")


def tunable(sub: OffsiteTuningSubModel, lora: LoraSettings | None = None) -> nn.Module:
    """The module to hand the Trainer: ``sub.model`` (adapters trainable) or a PEFT model with LoRA on the
    adapters. LoRA is injected into ``sub.model`` in place; ``merge_lora`` folds it back before a plug-in."""
    if lora is None:
        return sub.model
    from peft import LoraConfig, get_peft_model

    family = family_of(sub.model)
    adapters = sorted(i for name in ADAPTERS for i in sub.layers[name])
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(family.lora_targets),
        layers_to_transform=adapters,
        layers_pattern=family.layers_pattern,
        fan_in_fan_out=family.lora_fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        return get_peft_model(sub.model, config)


def merge_lora(model: nn.Module) -> None:
    """Fold LoRA factors into the adapter weights (in place), leaving the sub model's plain layout."""
    if hasattr(model, "merge_and_unload"):
        model.merge_and_unload()


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
