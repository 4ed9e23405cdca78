"""Seq2SeqCollator: pads prompt/answer items into a batch, with -100 wherever no loss should be taken.

Items are ``{"input_ids": prompt ids, "labels": answer ids}`` (as :class:`QaDataset` gives them). Both keys
are model inputs, so they survive the Trainer's removal of unused columns, which drops any other key
before the collator sees it.

- decoder-only (GPT-2, Llama): ``input_ids = prompt + answer``, ``labels = [-100] * len(prompt) + answer``,
  so the loss is on the answer only. The model shifts labels by one itself.
- encoder-decoder (T5, BART): ``input_ids`` = prompt, ``labels`` = answer, each padded on its own.

Padding uses ``pad_token_id`` in ``input_ids``, 0 in ``attention_mask`` and -100 in ``labels``, so a pad id
equal to EOS (GPT-2) never hides the answer's real EOS from the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from fedfleet.errors import DataError
from fedfleet.hf.data.tokenizer import require_pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # what torch's cross-entropy (and every HF model's loss) skips

Ids = Sequence[int] | Tensor


@dataclass(frozen=True)
class Seq2SeqCollator:
    """Callable on a list of items; returns ``{input_ids, attention_mask, labels}`` int64 tensors."""

    pad_token_id: int
    decoder_only: bool = True
    padding_side: Literal["left", "right"] = "right"
    pad_to_multiple_of: int | None = None  # e.g. 8, for tensor-core friendly shapes on GPU
    label_pad_id: int = IGNORE_INDEX

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **kwargs: object) -> Seq2SeqCollator:
        """A collator with the tokenizer's pad id and padding side (a DataError if it has no pad token)."""
        kwargs.setdefault("padding_side", tokenizer.padding_side)
        return cls(require_pad_token(tokenizer), **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Ids]]) -> dict[str, Tensor]:
        if not features:
            raise DataError("Seq2SeqCollator got an empty batch")
        prompts = [_ids(f, "input_ids") for f in features]
        answers = [_ids(f, "labels") for f in features]
        if self.decoder_only:
            pairs = list(zip(prompts, answers, strict=True))
            inputs = [torch.cat([p, a]) for p, a in pairs]
            labels = [torch.cat([torch.full_like(p, self.label_pad_id), a]) for p, a in pairs]
            width = self._width(inputs)
            return {
                "input_ids": self._pad(inputs, self.pad_token_id, width),
                "attention_mask": self._pad([torch.ones_like(x) for x in inputs], 0, width),
                "labels": self._pad(labels, self.label_pad_id, width),
            }
        width, label_width = self._width(prompts), self._width(answers)
        return {
            "input_ids": self._pad(prompts, self.pad_token_id, width),
            "attention_mask": self._pad([torch.ones_like(x) for x in prompts], 0, width),
            "labels": self._pad(answers, self.label_pad_id, label_width),
        }

    def _width(self, rows: list[Tensor]) -> int:
        width = max(len(r) for r in rows)
        m = self.pad_to_multiple_of
        return -(-width // m) * m if m else width

    def _pad(self, rows: list[Tensor], value: int, width: int) -> Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.int64)
        for i, row in enumerate(rows):
            if self.padding_side == "left":
                out[i, width - len(row) :] = row
            else:
                out[i, : len(row)] = row
        return out


def _ids(feature: Mapping[str, Ids], key: str) -> Tensor:
    if key not in feature:
        raise DataError(f"Seq2SeqCollator needs {key!r} in every item; got keys {', '.join(feature)}")
    return torch.as_tensor(feature[key], dtype=torch.int64).reshape(-1)
