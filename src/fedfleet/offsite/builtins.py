"""Built-in GPT-2 and LLaMA main/sub models with FATE-LLM's names and signatures.

``model_name_or_path`` is a local path (pretrained weights for the main model, the config for the sub model) or a
config object (random weights, for offline tests and benchmarks). The sub model is always built from the config
with ``b + e + t`` blocks: its weights come from the owner. The sub models take FATE's ``partial_weight_decay``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfleet.offsite.extract import sub_config
from fedfleet.offsite.models import OffsiteTuningMainModel, OffsiteTuningSubModel, _config


class _Builtin:
    """FATE-LLM's constructor and the family facts of a built-in model; the main or sub base class follows it
    in the MRO and takes the layer numbers."""

    model_class_name: str
    blocks_path: tuple[str, ...]

    def __init__(
        self,
        model_name_or_path: Any,
        emulator_layer_num: int,
        adapter_top_layer_num: int = 2,
        adapter_bottom_layer_num: int = 2,
        fp16_mix_precision: bool = False,
        seed: int | None = 0,
    ) -> None:
        self.model_name_or_path, self.seed = model_name_or_path, seed
        super().__init__(emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num, fp16_mix_precision)

    def _model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class_name)

    def get_model_transformer_blocks(self, model: nn.Module) -> nn.ModuleList:
        obj: Any = model
        for part in self.blocks_path:
            obj = getattr(obj, part)
        return obj


class _BuiltinMain(_Builtin, OffsiteTuningMainModel):
    def get_base_model(self) -> nn.Module:
        if isinstance(self.model_name_or_path, str):
            return self._model_class().from_pretrained(self.model_name_or_path)
        return _instantiate(self._model_class(), self.model_name_or_path, self.seed)


class _BuiltinSub(_Builtin, OffsiteTuningSubModel):
    def __init__(
        self,
        model_name_or_path: Any,
        emulator_layer_num: int,
        adapter_top_layer_num: int = 2,
        adapter_bottom_layer_num: int = 2,
        fp16_mix_precision: bool = False,
        partial_weight_decay: float | None = None,  # FATE-LLM's sub models take it here
        seed: int | None = 0,
    ) -> None:
        super().__init__(
            model_name_or_path, emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num,
            fp16_mix_precision, seed,
        )  # fmt: skip
        self.partial_weight_decay = partial_weight_decay

    def get_base_model(self) -> nn.Module:
        # initialised from the config: random weights, replaced by what the model owner sends
        return _instantiate(self._model_class(), sub_config(_config(self.model_name_or_path), self.plan), self.seed)


def _instantiate(cls: Any, config: Any, seed: int | None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config)


class GPT2LMHeadMainModel(_BuiltinMain):
    model_class_name = "GPT2LMHeadModel"
    blocks_path = ("transformer", "h")


class GPT2LMHeadSubModel(_BuiltinSub):
    model_class_name = "GPT2LMHeadModel"
    blocks_path = ("transformer", "h")


class LlamaMainModel(_BuiltinMain):
    model_class_name = "LlamaForCausalLM"
    blocks_path = ("model", "layers")


class LlamaSubModel(_BuiltinSub):
    model_class_name = "LlamaForCausalLM"
    blocks_path = ("model", "layers")
