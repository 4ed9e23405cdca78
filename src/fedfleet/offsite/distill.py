"""The paper's distilled emulator: the layer-drop emulator, trained to do what the whole middle does.

Offsite-Tuning (Xiao, Lin and Han, 2023) starts the emulator as a uniform layer drop of the middle blocks and
then distils it on public text: the emulator and the full middle both take the bottom adapter's output, and the
emulator is trained to minimise the squared distance between their outputs. Adapters tuned against a more
faithful emulator plug into the full model better (the paper's Table 4).

Only the model owner runs this, before handing out the sub model. The full model's own blocks never change: the
emulator is trained in a sub model and kept beside the full model (``main.distilled_emulator``), and
``main.get_submodel_weights()`` sends it in place of the layer-drop blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedfleet.offsite.evaluate import _device
from fedfleet.offsite.extract import section_state
from fedfleet.offsite.models import OffsiteTuningMainModel, OffsiteTuningSubModel

Batch = Mapping[str, Tensor]  # input_ids (and attention_mask), as LmBlocks items stacked


def distill_emulator(
    main: OffsiteTuningMainModel,
    sub: OffsiteTuningSubModel,
    batches: Iterable[Batch],
    lr: float = 1e-4,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train ``sub``'s emulator on ``batches`` (public text) to reproduce the full middle of ``main``; afterwards
    ``main`` sends the distilled emulator. ``sub`` is the data owners' skeleton (e.g. ``AutoSubModel``), loaded
    here with what ``main`` sends now. Returns the loss of each step (mean squared distance per hidden unit)."""
    sub.load_submodel_weights(main.get_submodel_weights())
    for p in sub.model.parameters():
        p.requires_grad_(False)
    params = list(sub.get_emulator().parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = sub.model.training
    main.model.eval()
    sub.model.eval()  # no dropout: the emulator should match the deterministic middle
    losses = []
    try:
        for batch in batches:
            with torch.no_grad():
                target = _top_input(main, batch)
            loss = F.mse_loss(_top_input(sub, batch), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        sub.initialize_model()  # the sub model's usual state: only the adapters require grad
        sub.model.train(was_training)
    main.distilled_emulator = {k: v.clone() for k, v in section_state(sub.blocks, _emulator_of(sub)).items()}
    return losses


@torch.no_grad()
def emulator_gap(main: OffsiteTuningMainModel, sub: OffsiteTuningSubModel, batches: Iterable[Batch]) -> float:
    """Mean squared distance between what the emulator ``main`` sends and its full middle output, on ``batches``
    (held-out text): how faithful the emulator is, before and after ``distill_emulator``."""
    sub.load_submodel_weights(main.get_submodel_weights())
    main.model.eval()
    sub.model.eval()
    total, count = 0.0, 0
    for batch in batches:
        out, target = _top_input(sub, batch), _top_input(main, batch)
        total += float(F.mse_loss(out, target, reduction="sum"))
        count += target.numel()
    return total / count


def _emulator_of(sub: OffsiteTuningSubModel) -> dict[str, tuple[int, ...]]:
    return {"emulator": sub.layers["emulator"]}


def _hidden(model: nn.Module, batch: Batch) -> tuple[Tensor, ...]:
    """Every block's input (``hidden_states[i]`` enters block i) from the base model: no LM head is computed."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(_device(model))}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(inputs["input_ids"].device)
    return model.base_model(**inputs, output_hidden_states=True).hidden_states


def _top_input(m: OffsiteTuningMainModel | OffsiteTuningSubModel, batch: Batch) -> Tensor:
    """What enters the top adapter: the full middle's output in the main model, the emulator's in a sub model
    (with no top adapter, the last hidden state, after the final norm in both)."""
    top = m.layers["adapter_top"]
    return _hidden(m.model, batch)[top[0] if top else -1].float()
