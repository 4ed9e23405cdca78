"""``fedfleet tokenize``: pre-tokenised corpora for compute nodes without network (fedfleet.hf.data.token_blocks)."""

from __future__ import annotations

import argparse
import os
from typing import Any

TOKENIZE_HELP = """\
Tokenise text files into OUT, a folder a party's compute nodes read offline: the token ids as safetensors
shards of blocks of --seq-len ids (documents joined by the end-of-text token, the last partial block
dropped), the tokenizer saved beside them, and manifest.json with every file's SHA-256 and the tokenizer's
fingerprint. Run it where the data is (a login node, a laptop); copy OUT to the site; train with
    from fedfleet.hf.data import TokenBlocks
    train_set = TokenBlocks("OUT", tokenizer)   # checksums checked, ids from another vocabulary refused

Text files: .txt (a document per line), .jsonl and .csv (the --text-column field of each row).
--tokenizer: a folder saved by save_pretrained (read with no network), or gpt2 (GPT-2's BPE, shipped).
OUT is written under a temporary name and renamed into place; an existing corpus is replaced only with
--overwrite, and a folder that is not one is never touched.

examples:
  fedfleet tokenize train.jsonl --tokenizer ./llama-tokenizer --out corpus-a --seq-len 2048
  fedfleet tokenize part1.txt part2.txt --tokenizer gpt2 --out corpus-b --seq-len 512
"""


def add_tokenize_parser(sub: Any) -> argparse.ArgumentParser:
    tok = sub.add_parser(
        "tokenize",
        help="tokenise text files into a corpus folder that compute nodes read offline",
        description=TOKENIZE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tok.add_argument("sources", metavar="TEXT", nargs="+", help=".txt, .jsonl or .csv files")
    tok.add_argument("--out", required=True, metavar="OUT", help="the corpus folder to write")
    tok.add_argument("--tokenizer", required=True, metavar="DIR|gpt2", help="a saved tokenizer folder, or gpt2")
    tok.add_argument("--seq-len", type=int, default=512, metavar="N", help="ids per block (default 512)")
    tok.add_argument("--text-column", default="text", metavar="NAME", help="the text field of .jsonl/.csv rows")
    tok.add_argument("--shard-mb", type=float, default=256, metavar="MB", help="largest shard (default 256 MB)")
    tok.add_argument("--overwrite", action="store_true", help="replace OUT if it is a corpus tokenize wrote")
    tok.add_argument("--quiet", action="store_true", help="no progress on stderr")
    tok.set_defaults(func=tokenize_command)
    return tok


def tokenize_command(args: argparse.Namespace) -> int:
    from fedfleet.hf.data.token_blocks import stderr_progress, tokenize_corpus

    summary = tokenize_corpus(
        args.sources,
        load_tokenizer(args.tokenizer),
        args.out,
        seq_len=args.seq_len,
        text_column=args.text_column,
        shard_bytes=int(args.shard_mb * (1 << 20)),
        overwrite=args.overwrite,
        progress=None if args.quiet else stderr_progress,
    )
    print(
        f"tokenised {summary.documents:,} documents into {summary.path}: {summary.tokens:,} tokens, "
        f"{summary.blocks:,} blocks in {summary.shards} shards ({summary.dropped_tokens} tokens of the last partial "
        f"block dropped) in {summary.seconds:.1f} s"
    )
    return 0


def load_tokenizer(name: str) -> Any:
    """``gpt2`` (the shipped BPE files) or a save_pretrained folder, never a download."""
    from fedfleet.errors import DataError

    if name == "gpt2":
        from fedfleet.hf.data.tokenizer import gpt2_tokenizer

        return gpt2_tokenizer()
    if not os.path.isdir(name):
        raise DataError(f"--tokenizer {name}: not a folder (give one saved by save_pretrained, or gpt2)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"--tokenizer {name}: not a tokenizer folder ({exc})") from None
