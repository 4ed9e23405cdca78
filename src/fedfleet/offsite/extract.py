"""Reading and writing the shared sections of a model: adapters, emulator, extras, as flat named tensors.

Keys are section-relative, ``"adapter_bottom.0.attn.c_attn.weight"``, ``"emulator.3.mlp.c_fc.bias"``: the same
key names the same tensor role in the main model and in the sub model, whatever block index it has in either.
Reading returns views (no copy); writing copies in place under ``no_grad`` and checks every key and shape, so
a plug-in either loads everything or fails naming what is missing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
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


def flat_extras(extra: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """The extras a model shares, as flat ``{key: tensor}``: FATE-style nested dicts (``{"last_ln_f": {"weight":
    ..., "bias": ...}}``, what ``get_numpy_state_dict`` gives) become ``"last_ln_f.weight"``, ...; numpy arrays
    become tensors sharing their memory. Flat keys are what the flat buffers and the wire carry."""
    flat: dict[str, Tensor] = {}
    for key, value in extra.items():
        name = f"{prefix}{key}"
        parts = flat_extras(value, f"{name}.") if isinstance(value, Mapping) else {name: _tensor(name, value)}
        clash = sorted(parts.keys() & flat.keys())
        if clash:
            raise ConfigError(f"additional params name {clash[0]!r} twice (once nested, once flat)")
        flat.update(parts)
    return flat


def _tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ConfigError(
        f"additional param {name!r} is a {type(value).__name__}; get_additional_param_state_dict must give tensors, "
        f"numpy arrays or dicts of them"
    )


class NestedExtras(dict):
    """Flat extras that also answer FATE's nested reads: ``extras["last_ln_f"]`` is ``{"weight": ..., "bias":
    ...}`` when only ``"last_ln_f.weight"`` and ``"last_ln_f.bias"`` are keys. An exact key always wins, so flat
    names with dots (``"transformer.wte.weight"``) read as before."""

    def __missing__(self, key: str) -> dict[str, Any]:
        head = f"{key}."
        inner = {k[len(head) :]: v for k, v in self.items() if k.startswith(head)}
        if not inner:
            raise KeyError(key)
        return inner


def numpy_state_dict(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """FATE's ``get_numpy_state_dict``: ``{name: module.state_dict()}``, detached tensors (views, no copy; numpy
    has no bfloat16), which ``split_numpy_array`` and :func:`load_numpy_state_dict` take as they take arrays."""
    return {name: dict(module.state_dict()) for name, module in modules.items()}


def load_numpy_state_dict(modules: Mapping[str, nn.Module], state: Mapping[str, Any]) -> None:
    """FATE's ``load_numpy_state_dict``: ``state[name]`` (``{param: array or tensor}``) into ``modules[name]``,
    every param of the module required; names ``state`` lacks are skipped, as FATE skips them. A bare matrix
    (what ``recover_numpy_array`` returns) loads into a module with one param (an embedding's ``weight``)."""
    for name, module in modules.items():
        if name not in state:
            continue
        value, own = state[name], module.state_dict()
        if not isinstance(value, Mapping):
            if len(own) != 1:
                raise ConfigError(
                    f"{name!r}: one array given for a module with params {', '.join(own)}; give {{param: array}}"
                )
            value = {next(iter(own)): value}
        try:
            module.load_state_dict({k: torch.as_tensor(v) for k, v in value.items()})
        except RuntimeError as exc:  # missing, unexpected or misshapen params: say which module
            raise ConfigError(f"{name!r}: {exc}") from None


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
