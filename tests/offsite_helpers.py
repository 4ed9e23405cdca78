"""Helpers for the Offsite-Tuning tests: a tiny GPT-2 with the real BPE vocabulary, review-text LM blocks."""

from __future__ import annotations

import threading
from pathlib import Path

from transformers import GPT2Config, TrainingArguments

from fedfleet.hf import FedArguments, FedAvgClient
from fedfleet.hf.data import gpt2_tokenizer
from fedfleet.offsite.data import LmBlocks, review_texts, split


def tiny_config(layers: int = 6) -> GPT2Config:
    """Random weights with a wide init: with the default 0.02 the frozen tied embeddings bound the logits to about
    +-0.1, so no adapter could move the loss of a random model much."""
    tok = gpt2_tokenizer()
    return GPT2Config(
        n_layer=layers,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
    )


def owner_blocks(parties: int, texts: int = 120, held_out: int = 24, block: int = 32) -> tuple[list, LmBlocks]:
    tok = gpt2_tokenizer()
    shares, test = split(review_texts(texts, seed=0), parties, held_out)
    return [LmBlocks(tok, s, block) for s in shares], LmBlocks(tok, test, block)


def training_args(out: Path, steps: int = 10, seed: int = 0, lr: float = 1e-2) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )


def train_in_threads(models, ctxs, datasets, tmp: Path, steps: int, fed_args: FedArguments) -> list[FedAvgClient]:
    clients = [
        FedAvgClient(
            ctx=c,
            model=m,
            fed_args=fed_args,
            training_args=training_args(tmp / f"p{i}", steps, seed=i),
            train_set=d,
            tokenizer=gpt2_tokenizer(),
        )
        for i, (m, c, d) in enumerate(zip(models, ctxs, datasets, strict=True))
    ]
    errors: list[BaseException] = []

    def run(client: FedAvgClient) -> None:
        try:
            client.train()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return clients


def losses(client: FedAvgClient) -> list[float]:
    return [e["loss"] for e in client.state.log_history if "loss" in e]
