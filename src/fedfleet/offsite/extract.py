"""Reading and writing the shared sections of a model: adapters, emulator, extras, as flat named tensors.

Keys are section-relative, ``"adapter_bottom.0.attn.c_attn.weight"``, ``"emulator.3.mlp.c_fc.bias"``: the same
key names the same tensor role in the main model and in the sub model, whatever block index it has in either.
Reading returns views (no copy); writing copies in place under ``no_grad`` and checks every key and shape, so
a plug-in either loads everything or fails naming what is missing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from fedfleet.errors import ConfigError
from fedfleet.offsite.plan import OffsitePlan


def section_state(blocks: nn.ModuleList, layers: Mapping[str, Iterable[int]]) -> dict[str, Tensor]:
    """``{section.k.param: tensor}`` for the blocks ``layers[section]`` (k counts within the section)."""
    state: dict[str, Tensor] = {}
    for section, indices in layers.items():
        for k, i in enumerate(indices):
            for name, p in blocks[i].named_parameters():
                state[f"{section}.{k}.{name}"] = p.detach()
    return state


def load_section_state(
    blocks: nn.ModuleList, layers: Mapping[str, Iterable[int]], state: Mapping[str, Tensor]
) -> list[str]:
    """Copy ``state`` into the blocks of the given sections; returns the keys used. Every tensor of those
    sections must be present with its shape (a partial plug-in would leave a half-tuned model)."""
    target = section_state(blocks, layers)
    missing = [k for k in target if k not in state]
    if missing:
        raise ConfigError(
            f"the weights lack {len(missing)} tensor(s) of sections {', '.join(layers)} (first: {missing[:3]}); "
            f"were they made with the same emulator_layer_num / adapter_*_layer_num and model config?"
        )
    with torch.no_grad():
        for key, dst in target.items():
            src = state[key]
            if src.shape != dst.shape:
                raise ConfigError(f"{key}: shape {tuple(src.shape)} does not fit the model's {tuple(dst.shape)}")
            dst.copy_(src)
    return list(target)


def outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> dict[str, Tensor]:
    """The parameters that are not in any block (embeddings, final norm, untied head), by model name."""
    inside = {id(p) for p in blocks.parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if id(p) not in inside}


def load_named(model: nn.Module, state: Mapping[str, Tensor], names: Iterable[str]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if name not in params:
                raise ConfigError(f"extra tensor {name!r} is not a parameter of {type(model).__name__}")
            if state[name].shape != params[name].shape:
                raise ConfigError(
                    f"{name}: shape {tuple(state[name].shape)} vs the model's {tuple(params[name].shape)}"
                )
            params[name].copy_(state[name])


def sub_config(config: object, plan: OffsitePlan) -> object:
    """The main model's config cut to the sub model's ``b + e + t`` blocks (per-layer settings such as
    ``layer_types`` follow the blocks chosen), so ``AutoModelForCausalLM.from_config`` builds its skeleton."""
    n = int(config.num_hidden_layers)  # type: ignore[attr-defined]
    chosen = plan.main_layers(n)
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = len(chosen)  # type: ignore[attr-defined]
    per_layer = getattr(config, "layer_types", None)
    if isinstance(per_layer, (list, tuple)) and len(per_layer) == n:
        cut.layer_types = [per_layer[i] for i in chosen]  # type: ignore[attr-defined]
    return cut
