"""Offline text and QA for Offsite-Tuning runs: language-model blocks from real review texts, MMLU questions.

Both come from wheels installed with fedfleet's hf extra (see ``fedfleet.hf.data``); nothing is downloaded.
:func:`check_causal_batches` tells a data owner before its hand-out when its collator cannot feed a causal LM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def check_causal_batches(collator: Any, dataset: Any) -> None:
    """Collate the first two items as the Trainer will and check that ``labels`` line up with ``input_ids``, as a
    causal LM's loss needs. Items that keep a prompt and its answer apart (``QaDataset``) need fedfleet's
    ``Seq2SeqCollator``; transformers' ``DataCollatorForSeq2Seq`` (FATE-LLM's tutorial's) pads the two
    separately, for encoder-decoder models, and the model then fails deep in its loss with a bare shape error."""
    try:
        items = [dataset[i] for i in range(min(2, len(dataset)))]
    except Exception:  # not an indexable dataset (an iterable one): nothing to look at in advance
        return
    if not items or not all(isinstance(it, Mapping) and {"input_ids", "labels"} <= it.keys() for it in items):
        return
    if collator is None:
        if any(len(it["input_ids"]) != len(it["labels"]) for it in items):
            raise DataError(_hint("the items have input_ids and labels of different lengths and no data_collator"))
        return
    try:
        batch = collator(items)
    except Exception:  # a collator with needs of its own: the Trainer reports its error as it is
        return
    ids, labels = batch.get("input_ids"), batch.get("labels")
    shapes = [tuple(getattr(x, "shape", ())) for x in (ids, labels)]
    if ids is not None and labels is not None and shapes[0] != shapes[1]:
        name = type(collator).__name__
        raise DataError(_hint(f"{name} gives input_ids of shape {shapes[0]} but labels of shape {shapes[1]}"))


def _hint(what: str) -> str:
    return (
        f"{what}: a causal LM needs labels as long as input_ids. fedfleet's QaDataset keeps each prompt "
        f"(input_ids) and answer (labels) apart, and transformers' DataCollatorForSeq2Seq pads them separately "
        f"(it is for encoder-decoder models); give data_collator=Seq2SeqCollator.for_tokenizer(tokenizer) "
        f"(from fedfleet.hf.data import Seq2SeqCollator), which joins them and masks the prompt out of the loss"
    )
