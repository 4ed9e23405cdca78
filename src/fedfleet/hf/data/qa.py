"""QaDataset: question/answer pairs tokenized once and cached on disk, served as ``{input_ids, labels}``.

Each item keeps the prompt (``input_ids``) and the answer (``labels``) apart; :class:`Seq2SeqCollator`
decides the layout: one sequence with the prompt masked out for a decoder-only LM, or encoder input and
decoder target for an encoder-decoder. The cache is one ``.npz`` per (tokenizer, data, settings), so every
party and every rerun with the same inputs reads ids instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedfleet.errors import DataError
from fedfleet.hf.data.mmlu import QaPair
from fedfleet.hf.data.tokenizer import tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_FORMAT = 1  # bump when the layout or the truncation rule changes, so old caches are not read


class QaDataset(Dataset):
    """Tokenized QA pairs; ``ds[i] == {"input_ids": prompt ids, "labels": answer ids}`` (1-D int64, unpadded).

    ``max_length`` bounds prompt + answer together (+ EOS): the prompt loses tokens from its start (the
    question's end and the ``A:`` cue matter most), the answer from its end, and neither drops below half
    of the budget while the other needs room. ``cache_hit`` says whether the ids came from ``cache_dir``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[QaPair],
        *,
        max_length: int = 512,
        cache_dir: str | Path | None = None,
        add_eos: bool = True,
    ) -> None:
        if not pairs:
            raise DataError("QaDataset needs at least one question/answer pair")
        if max_length < 2:
            raise DataError(f"max_length must be >= 2 (one prompt and one answer token), got {max_length}")
        self.max_length = max_length
        self.key = cache_key(tokenizer, pairs, max_length=max_length, add_eos=add_eos)
        self.cache_path = Path(cache_dir) / f"qa-{self.key}.npz" if cache_dir is not None else None
        self.cache_hit = False
        arrays = self._read_cache()
        if arrays is None:
            arrays = _tokenize(tokenizer, pairs, max_length, add_eos)
            self._write_cache(arrays)
        self._prompts, self._prompt_offsets = arrays["prompts"], arrays["prompt_offsets"]
        self._answers, self._answer_offsets = arrays["answers"], arrays["answer_offsets"]

    def __len__(self) -> int:
        return len(self._prompt_offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        p0, p1 = self._prompt_offsets[index], self._prompt_offsets[index + 1]
        a0, a1 = self._answer_offsets[index], self._answer_offsets[index + 1]
        return {
            "input_ids": torch.from_numpy(self._prompts[p0:p1].astype(np.int64)),
            "labels": torch.from_numpy(self._answers[a0:a1].astype(np.int64)),
        }

    def _read_cache(self) -> dict[str, np.ndarray] | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            with np.load(self.cache_path) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError):
            return None  # a torn or foreign file: tokenize again and overwrite it
        if str(arrays.pop("key", "")) != self.key:
            return None
        self.cache_hit = True
        return arrays

    def _write_cache(self, arrays: dict[str, np.ndarray]) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename: parties sharing a folder never read a half-written cache
        tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(self.key), **arrays)
        os.replace(tmp, self.cache_path)


def cache_key(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[QaPair], **settings: object) -> str:
    """sha256 of the tokenizer's fingerprint, the texts, the settings and the cache format."""
    data = hashlib.sha256()
    for pair in pairs:
        data.update(json.dumps([pair.prompt, pair.answer]).encode())
    spec = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "data": data.hexdigest()}
    return hashlib.sha256(json.dumps({**spec, **settings}, sort_keys=True).encode()).hexdigest()


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[QaPair], max_length: int, add_eos: bool
) -> dict[str, np.ndarray]:
    prompts = tokenizer([p.prompt for p in pairs], add_special_tokens=True)["input_ids"]
    # the answer continues the prompt: no BOS/CLS of its own
    answers = tokenizer([p.answer for p in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    kept_prompts, kept_answers = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        answer = answer + eos
        keep = min(len(prompt), max(max_length - len(answer), max_length // 2))
        kept_prompts.append(prompt[len(prompt) - keep :])
        kept_answers.append(answer[: max_length - keep])
    return {**_flat("prompt", kept_prompts), **_flat("answer", kept_answers)}


def _flat(name: str, rows: list[list[int]]) -> dict[str, np.ndarray]:
    # one flat int32 array + offsets: a compact cache and O(1) slicing, instead of a list of tensors
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    return {f"{name}s": flat, f"{name}_offsets": offsets}
