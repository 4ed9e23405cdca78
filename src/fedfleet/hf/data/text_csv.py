"""TokenizerDataset: a CSV of ``text,label`` rows, tokenized once, served as Trainer-ready dicts.

Named after FATE-LLM's TokenizerDataset, and used the same way (settings first, then ``load(path)``), but it
takes a tokenizer object instead of a hub name, and every problem with the file is a DataError naming it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedfleet.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Padding = Literal["longest", "max_length", "do_not_pad"]


class CsvRows:
    """The named columns of a CSV file as lists of strings, with each row's line number for messages."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"CSV file not found: {self.path}")
        with open(self.path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise DataError(f"{self.path} is empty: expected a header row with columns {', '.join(columns)}")
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(
                    f"{self.path} has no {' or '.join(map(repr, missing))} column; its columns are: "
                    f"{', '.join(header)} (name the right ones with text_column= / label_column=)"
                )
            self.lines: list[int] = []
            self.columns: dict[str, list[str]] = {c: [] for c in columns}
            for row in reader:
                self.lines.append(reader.line_num)
                for c in columns:
                    self.columns[c].append(row[c] or "")  # a short row gives None: treat as empty
        if not self.lines:
            raise DataError(f"{self.path} has a header but no rows")

    def class_ids(self, column: str) -> Tensor:
        """The column as int64 class ids 0, 1, ...; "1.0" (as pandas writes ints with gaps) is accepted."""
        ids = []
        for line, value in zip(self.lines, self.columns[column], strict=True):
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not number.is_integer() or number < 0:
                raise DataError(
                    f"{self.path}: the label column {column!r} must hold class ids 0, 1, 2, ...; "
                    f"line {line} has {value!r}"
                )
            ids.append(int(number))
        return torch.tensor(ids, dtype=torch.int64)


class TokenizerDataset(Dataset):
    """Tokenized texts and integer labels from a CSV file; ``ds[i]`` is ``{input_ids, attention_mask, labels}``.

    ``padding="longest"`` pads every row to the longest text in the file (FATE's behaviour, so the Trainer's
    default collator can stack rows); ``"max_length"`` pads to ``max_length``; ``"do_not_pad"`` keeps rows
    ragged, for a padding collator such as transformers' ``DataCollatorWithPadding``.

    >>> ds = TokenizerDataset(gpt2_tokenizer(), max_length=128).load("reviews.csv")
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_column: str = "text",
        label_column: str | None = "label",
        max_length: int = 128,
        padding: Padding = "longest",
        truncation: bool = True,
        padding_side: Literal["left", "right"] | None = None,
    ) -> None:
        if max_length < 1:
            raise DataError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.label_column = label_column
        self.max_length = max_length
        self.padding = padding
        self.truncation = truncation
        self.padding_side = padding_side
        self.texts: list[str] = []
        self.features: dict[str, Tensor | list[list[int]]] = {}
        self.labels: Tensor | None = None
        self.path: Path | None = None

    def load(self, path: str | Path) -> TokenizerDataset:
        """Read and tokenize ``path`` (replacing anything loaded before); returns self for chaining."""
        columns = [self.text_column] + ([self.label_column] if self.label_column else [])
        rows = CsvRows(path, columns)
        labels = rows.class_ids(self.label_column) if self.label_column else None
        texts = rows.columns[self.text_column]
        padded = self.padding != "do_not_pad"
        if padded and self.tokenizer.pad_token_id is None:
            raise DataError(
                f"{type(self.tokenizer).__name__} has no pad token: set tokenizer.pad_token = tokenizer.eos_token "
                "or use padding='do_not_pad' with a padding collator"
            )
        extra = {"padding_side": self.padding_side} if self.padding_side else {}
        encoded = self.tokenizer(
            texts,
            padding=self.padding,
            truncation=self.truncation,
            max_length=self.max_length,
            return_tensors="pt" if padded else None,
            **extra,
        )
        # only what the model's forward takes (BERT adds token_type_ids; offsets etc. are dropped)
        self.features = {k: encoded[k] for k in self.tokenizer.model_input_names if k in encoded}
        self.texts, self.labels, self.path = texts, labels, rows.path
        return self

    def __len__(self) -> int:
        if self.path is None:
            raise RuntimeError("TokenizerDataset is empty: call load(path) first")
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {k: torch.as_tensor(v[index]) for k, v in self.features.items()}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    def get_classes(self) -> list[int]:
        """The distinct labels present, sorted (FATE's name)."""
        return [] if self.labels is None else torch.unique(self.labels).tolist()

    def get_vocab_size(self) -> int:
        """How many ids the tokenizer can produce, added tokens included (FATE's name)."""
        return len(self.tokenizer)
