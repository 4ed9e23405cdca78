"""FATE-LLM's ``OffsiteTuningMainModel`` (model owner) and ``OffsiteTuningSubModel`` (data owner), and the
generic ``AutoMainModel`` / ``AutoSubModel`` that need no subclass (the family table says where the blocks are).

A subclass implements ``get_base_model`` (and, if its family is not registered, ``get_model_transformer_blocks``);
the base class cuts the blocks, freezes all but the adapters, and moves weights in and out::

    main = AutoMainModel(GPT2Config(...), emulator_layer_num=4, adapter_top_layer_num=2, adapter_bottom_layer_num=2)
    sub = AutoSubModel(main.model.config, 4, 2, 2)
    sub.load_submodel_weights(main.get_submodel_weights())   # owner -> data owner: adapters, emulator, extras
    ... train sub.model (only the adapters require grad) ...
    main.load_submodel_weights(sub.get_submodel_weights())   # the plug-in: only the adapters are taken back

Weights are flat ``{key: tensor}`` dicts (see ``extract.py`` for the keys), not FATE's nested numpy dicts: they
go straight into fedfleet's flat buffers and over gRPC without a conversion. Extras a FATE-style subclass shares
as nested dicts or numpy arrays (``get_numpy_state_dict``, ``split_numpy_array``) are flattened on the way out
(``"last_ln_f.weight"``) and read back nested (``weights["last_ln_f"]``) by its ``load_additional_param_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from fedfleet.errors import ConfigError
from fedfleet.offsite.extract import (
    NestedExtras,
    flat_extras,
    load_named,
    load_numpy_state_dict,
    load_section_state,
    numpy_state_dict,
    outside_blocks,
    section_state,
    sub_config,
)
from fedfleet.offsite.families import family_of
from fedfleet.offsite.plan import ADAPTERS, SECTIONS, OffsitePlan


class _OffsiteTuningModel(nn.Module):
    def __init__(
        self,
        emulator_layer_num: int,
        adapter_top_layer_num: int = 2,
        adapter_bottom_layer_num: int = 2,
        fp16_mix_precision: bool = False,
    ) -> None:
        super().__init__()
        self.plan = OffsitePlan(emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num)
        self.emulator_layer_num = emulator_layer_num
        self.adapter_top_layer_num = adapter_top_layer_num
        self.adapter_bottom_layer_num = adapter_bottom_layer_num
        self.fp16_mix_precision = fp16_mix_precision
        self.model = self.get_base_model()
        self.layers = self.section_layers()  # validates the block count early, before any weight moves
        self.initialize_model()

    # -- what a subclass provides -----------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        raise NotImplementedError(
            f"{type(self).__name__} must implement get_base_model() (return the Hugging Face causal LM), or use "
            f"AutoMainModel / AutoSubModel, which take a model or config"
        )

    def get_model_transformer_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of decoder blocks; by default from the family table."""
        return family_of(model).block_list(model)

    def forward(self, x: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """FATE-style ``forward(batch_dict)``, or keyword arguments as the HF Trainer passes them. A subclass's own
        ``forward`` is what a data owner's ``OffsiteTuningClient`` trains through (``fedfleet.offsite.wrapper``)."""
        return self.model(**(dict(x) if x is not None else {}), **kwargs)

    def section_layers(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    # -- derived ----------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_model_transformer_blocks(self.model)

    def _section(self, name: str) -> nn.ModuleList:
        return nn.ModuleList([self.blocks[i] for i in self.layers[name]])

    def get_adapter_bottom(self) -> nn.ModuleList:
        return self._section("adapter_bottom")

    def get_adapter_top(self) -> nn.ModuleList:
        return self._section("adapter_top")

    def get_emulator(self) -> nn.ModuleList:
        return self._section("emulator")

    def initialize_model(self) -> None:
        """Half precision if asked; then only the adapters require grad (FATE-LLM's defaults)."""
        if self.fp16_mix_precision:
            self.model.half()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in ADAPTERS:
            for p in self._section(name).parameters():
                p.requires_grad_(True)

    def get_additional_param_state_dict(self) -> dict[str, Tensor]:
        """Extra tensors shared with the data owners. Default: every parameter outside the blocks (embeddings,
        final norm, an untied head), which the sub model needs to run. Override to withhold or re-chunk them."""
        return outside_blocks(self.model, self.blocks)

    def load_additional_param_state_dict(self, submodel_weights: Mapping[str, Tensor]) -> None:
        load_named(self.model, submodel_weights, submodel_weights.keys())

    # FATE-LLM's helpers for the two methods above (its tutorial's GPT-2 classes call them)
    def get_numpy_state_dict(self, module_dict: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
        """``{name: {param: tensor}}`` of the given modules: detached views, not numpy copies (see extract.py)."""
        return numpy_state_dict(module_dict)

    def load_numpy_state_dict(self, module_dict: Mapping[str, nn.Module], state_dict: Mapping[str, Any]) -> None:
        load_numpy_state_dict(module_dict, state_dict)

    def get_submodel_weights(self, with_emulator: bool = True) -> dict[str, Tensor]:
        """Adapters (+ emulator) + extras as ``{key: tensor}`` views of this model's parameters."""
        sections = {k: v for k, v in self.layers.items() if with_emulator or k != "emulator"}
        weights = section_state(self.blocks, sections)
        extra = flat_extras(self.get_additional_param_state_dict())
        clash = sorted(k for k in extra if k.split(".", 1)[0] in SECTIONS)
        if clash:
            raise ConfigError(f"additional params may not use the section prefixes {SECTIONS}: {clash[:3]}")
        weights.update(extra)
        return weights

    def submodel_param_count(self) -> int:
        return sum(t.numel() for t in self.get_submodel_weights().values())


class OffsiteTuningMainModel(_OffsiteTuningModel):
    """The model owner's full model. ``get_emulator`` is the uniform-stride subset of the middle blocks; a
    distilled emulator (``offsite.distill``), when there is one, is sent in their place."""

    distilled_emulator: dict[str, Tensor] | None = None  # emulator.k.* tensors, kept beside the full model

    def section_layers(self) -> dict[str, tuple[int, ...]]:
        return self.plan.section_layers(len(self.blocks))

    def get_submodel_weights(self, with_emulator: bool = True) -> dict[str, Tensor]:
        weights = super().get_submodel_weights(with_emulator)
        if with_emulator and self.distilled_emulator is not None:
            weights.update(self.distilled_emulator)  # the same keys: the layer-drop blocks' roles
        return weights

    def load_submodel_weights(self, submodel_weights: Mapping[str, Tensor], with_additional: bool = False) -> None:
        """The plug-in: copy the tuned adapters into the full model. The emulator is never loaded back (the full
        model's middle blocks are the originals); extras only with ``with_additional`` (if they were tuned)."""
        load_section_state(self.blocks, {k: self.layers[k] for k in ADAPTERS}, submodel_weights)
        if with_additional:
            self.load_additional_param_state_dict(_extras(submodel_weights))


class OffsiteTuningSubModel(_OffsiteTuningModel):
    """The data owner's model: ``b + e + t`` blocks (built from a config, random until weights are loaded).

    ``partial_weight_decay`` (FATE-LLM's; a subclass sets it): weight decay at that rate on the adapters' weights
    and none on biases and norm weights; ``OffsiteTuningClient`` builds its optimizer so."""

    partial_weight_decay: float | None = None

    def section_layers(self) -> dict[str, tuple[int, ...]]:
        have = len(self.blocks)
        if have != self.plan.sub_layers:
            raise ConfigError(
                f"{type(self).__name__}.get_base_model() built {have} blocks but the sub model needs "
                f"{self.plan.sub_layers} (adapter_bottom {self.plan.adapter_bottom_layer_num} + emulator "
                f"{self.plan.emulator_layer_num} + adapter_top {self.plan.adapter_top_layer_num}); set "
                f"num_hidden_layers in its config accordingly"
            )
        return self.plan.sub_section_layers()

    def load_submodel_weights(self, submodel_weights: Mapping[str, Tensor]) -> None:
        """Load what the owner sent: every section and the extras."""
        load_section_state(self.blocks, self.layers, submodel_weights)
        extras = _extras(submodel_weights)
        if extras:
            self.load_additional_param_state_dict(extras)


def _extras(weights: Mapping[str, Tensor]) -> NestedExtras:
    return NestedExtras({k: v for k, v in weights.items() if k.split(".", 1)[0] not in SECTIONS})


# -- the generic path: any registered family, no subclass -----------------------------------------------
def _build(source: Any, seed: int | None) -> nn.Module:
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(source, nn.Module):
        return source
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(source, PretrainedConfig):
            return AutoModelForCausalLM.from_config(source)
        if isinstance(source, (str, PathLike)):
            try:
                return AutoModelForCausalLM.from_pretrained(source)
            except OSError as exc:  # no weights there, or not a model folder at all
                raise ConfigError(f"cannot load a model from {str(source)!r}: {exc}") from None
    raise ConfigError(f"expected a model, a config or a path, got {type(source).__name__}")


def _config(source: Any) -> Any:
    """The config of a config, a model, or a path (a ``save_pretrained`` folder: its ``config.json``)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module) and isinstance(getattr(source, "config", None), PretrainedConfig):
        return source.config
    if isinstance(source, (str, PathLike)):
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:  # no config.json there, or one transformers cannot read
            raise ConfigError(f"cannot read a model config from {str(source)!r}: {exc}") from None
    raise ConfigError(f"expected a config or a path to one, got {type(source).__name__}")


class AutoMainModel(OffsiteTuningMainModel):
    """The owner's model from a model instance, a config (random weights, seeded) or a local path."""

    def __init__(
        self,
        model: Any,
        emulator_layer_num: int,
        adapter_top_layer_num: int = 2,
        adapter_bottom_layer_num: int = 2,
        fp16_mix_precision: bool = False,
        seed: int | None = 0,
    ) -> None:
        # set before nn.Module.__init__, which forbids assigning a module attribute that early
        object.__setattr__(self, "_source", model)
        self._seed = seed
        super().__init__(emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num, fp16_mix_precision)
        object.__delattr__(self, "_source")  # a given model now lives in self.model; keep no second reference

    def get_base_model(self) -> nn.Module:
        # an unknown architecture fails here, before any weights are built; a path is read for its config first
        family_of(self._source if isinstance(self._source, nn.Module) else _config(self._source))
        return _build(self._source, self._seed)


class AutoSubModel(OffsiteTuningSubModel):
    """The data owner's skeleton from the main model's config (or its path): same family, ``b + e + t`` blocks,
    random weights until ``load_submodel_weights``."""

    def __init__(
        self,
        main_config: Any,
        emulator_layer_num: int,
        adapter_top_layer_num: int = 2,
        adapter_bottom_layer_num: int = 2,
        fp16_mix_precision: bool = False,
        seed: int | None = 0,
        partial_weight_decay: float | None = None,
    ) -> None:
        self._main_config, self._seed = _config(main_config), seed
        super().__init__(emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num, fp16_mix_precision)
        self.partial_weight_decay = partial_weight_decay

    def get_base_model(self) -> nn.Module:
        family_of(self._main_config)
        return _build(sub_config(self._main_config, self.plan), self._seed)
