"""The paper's table on a held-out split: full model zero-shot, emulator zero-shot, emulator fine-tuned, plug-in.

Two metrics, each a function of (model, held-out data): perplexity on language-model blocks (exp of the mean
token negative log-likelihood, over every token of the split, not a mean of batch means) and multiple-choice
accuracy on QA (the answer " The answer is (X)." scored for every choice X the prompt offers, highest
log-likelihood wins: lm-eval's way of scoring MMLU).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ROWS = ("full zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in")
_CHOICE = re.compile(r"\(([A-J])\)")


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Any, batch_size: int = 8) -> float:
    """``blocks``: items ``{"input_ids", "labels"}`` of equal length (``LmBlocks``)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        items = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]
        ids = torch.stack([it["input_ids"] for it in items]).to(_device(model))
        labels = torch.stack([it["labels"] for it in items]).to(ids.device)
        logits = model(input_ids=ids).logits.float()
        # position t predicts token t + 1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / count)


@torch.no_grad()
def choice_accuracy(model: nn.Module, tokenizer: Any, pairs: Sequence[Any], max_prompt: int = 256) -> float:
    """Accuracy over ``QaPair``s with a ``letter``; the prompt keeps its last ``max_prompt`` tokens."""
    model.eval()
    right = 0
    for pair in pairs:
        letters = sorted(set(_CHOICE.findall(pair.prompt))) or ["A", "B", "C", "D"]
        prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"][-max_prompt:]
        scores = [_loglik(model, prompt, tokenizer(f" The answer is ({x}).")["input_ids"]) for x in letters]
        right += letters[max(range(len(letters)), key=scores.__getitem__)] == pair.letter
    return right / len(pairs)


def _loglik(model: nn.Module, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer], device=_device(model))
    logp = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    return float(logp.gather(1, torch.tensor(answer, device=ids.device)[:, None]).sum())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


Metric = Callable[[nn.Module], float]


def table(models: dict[str, nn.Module], metrics: dict[str, Metric]) -> dict[str, dict[str, float]]:
    """``{row: {metric: value}}`` for the rows given (in ``ROWS`` order)."""
    return {row: {name: fn(models[row]) for name, fn in metrics.items()} for row in ROWS if row in models}


def markdown(rows: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(rows.values())))
    lines = ["| setting | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    lines += [f"| {row} | " + " | ".join(f"{v[m]:.4g}" for m in metrics) + " |" for row, v in rows.items()]
    return "\n".join(lines)


def snapshot(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}
