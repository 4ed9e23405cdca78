"""Where each decoder family keeps its parts: the one place that knows model layouts.

Offsite-Tuning cuts a model into bottom adapter, middle (compressed into the emulator) and top adapter along
its list of transformer blocks; everything outside that list (token and position embeddings, the final norm,
the LM head) is shared with the data owners as frozen "extras" so that the sub model runs at all. A family
entry names those places by attribute path on the ``*ForCausalLM`` model, plus the modules LoRA targets.

Adding a family is one ``register_family(FamilySpec(...))`` call, no code path changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedfleet.errors import ConfigError


@dataclass(frozen=True)
class FamilySpec:
    """``blocks``: dotted path to the ``nn.ModuleList`` of decoder blocks (``"transformer.h"``).
    ``embeddings`` / ``final_norm`` / ``head``: dotted paths of the other parts (documentation, checks and
    chunked sharing; ``head`` may be tied to the token embedding). ``lora_targets``: linear layers inside a
    block that LoRA adapts. ``layers_pattern``: the ModuleList's attribute name, as PEFT's
    ``layers_to_transform`` needs it."""

    model_type: str
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str
    head: str
    lora_targets: tuple[str, ...]
    layers_pattern: str
    lora_fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = _get(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(
                f"{type(model).__name__}.{self.blocks} is a {type(blocks).__name__}, not the ModuleList of decoder "
                f"blocks that the {self.model_type!r} family entry promises; fix the entry with register_family"
            )
        return blocks


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, replace: bool = False) -> FamilySpec:
    """Teach fedfleet.offsite a decoder family (keyed by ``config.model_type``)."""
    if spec.model_type in FAMILIES and not replace:
        raise ConfigError(f"family {spec.model_type!r} is already registered; pass replace=True to override it")
    FAMILIES[spec.model_type] = spec
    return spec


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

for _spec in (
    FamilySpec("gpt2", "transformer.h", ("transformer.wte", "transformer.wpe"), "transformer.ln_f", "lm_head",
               ("c_attn", "c_proj", "c_fc"), "h", lora_fan_in_fan_out=True),
    FamilySpec("llama", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head", _LLAMA_LIKE, "layers"),
    FamilySpec("mistral", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head", _LLAMA_LIKE, "layers"),
    FamilySpec("qwen2", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head", _LLAMA_LIKE, "layers"),
    FamilySpec("opt", "model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
               "model.decoder.final_layer_norm", "lm_head", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
               "layers"),
    FamilySpec("bloom", "transformer.h", ("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
               "transformer.ln_f", "lm_head", ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), "h"),
):  # fmt: skip
    register_family(_spec)


def family_of(model_or_config: object) -> FamilySpec:
    """The family entry for a model or config; a clear error (naming how to register) when there is none."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{model_type!r} is an encoder-decoder model; Offsite-Tuning here cuts one stack of decoder blocks "
            f"(GPT-2, LLaMA, OPT, Bloom, Qwen2, Mistral ...). Use a causal LM"
        )
    spec = FAMILIES.get(model_type or "")
    if spec is None:
        raise ConfigError(
            f"no Offsite-Tuning family is registered for model type {model_type!r} "
            f"({type(model_or_config).__name__}); known: {', '.join(sorted(FAMILIES))}. If it is a decoder-only "
            f"causal LM, register it: fedfleet.offsite.register_family(FamilySpec(model_type={model_type!r}, "
            f"blocks='<path to the ModuleList of blocks>', embeddings=(...), final_norm=..., head='lm_head', "
            f"lora_targets=(...), layers_pattern=...)); encoder models (BERT) have no decoder blocks to cut"
        )
    return spec


def _get(root: nn.Module, path: str) -> nn.Module:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{type(root).__name__} has no {path!r} (missing {part!r}); is it a *ForCausalLM model of this "
                f"family? Fix the family entry with register_family(..., replace=True)"
            )
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]
