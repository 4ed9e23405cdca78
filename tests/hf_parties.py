"""Helpers for the Hugging Face tests: tiny GPT-2 classifiers on real reviews, and a recording callback."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, TrainerCallback, TrainingArguments

from fedfleet.core.params import FlatParams
from fedfleet.hf import FedArguments, FedAvgClient
from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer, split_csv, write_reviews_csv


def review_shares(folder: Path, parties: int, reviews: int = 96) -> list[Path]:
    return split_csv(write_reviews_csv(folder, limit=reviews, seed=0), folder / "split", parties, seed=0).parties


def tiny_gpt2(seed: int, n_embd: int = 32) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    tok = gpt2_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_layer=1,
        n_embd=n_embd,
        n_head=2,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2ForSequenceClassification(cfg)


class Before(TrainerCallback):
    """Runs just before the sync callback: the params a party sends at each sync point."""

    def __init__(self, client: FedAvgClient) -> None:
        self.client = client
        self.snapshots: list[FlatParams] = []

    def on_step_end(self, args, state, control, **kw):
        sync = self.client.fed_sync
        if sync.due(state.global_step):
            self.snapshots.append(sync.access.params.clone())


class After(TrainerCallback):
    """Runs after the sync callback: the params at the start (index 0) and after each sync."""

    def __init__(self, client: FedAvgClient) -> None:
        self.client = client
        self.snapshots: list[FlatParams] = []

    def on_train_begin(self, args, state, control, **kw):
        self.snapshots.append(self.client.fed_sync.access.params.clone())

    def on_step_end(self, args, state, control, **kw):
        if self.client.fed_sync.syncs > len(self.snapshots) - 1:
            self.snapshots.append(self.client.fed_sync.access.params.clone())


def make_client(
    ctx,
    csv: Path,
    seed: int,
    fed_args: FedArguments,
    out: Path,
    epochs: float = 2,
    model=None,
    update_transforms=(),
    **client_kwargs,
):
    tok = gpt2_tokenizer()
    train = TokenizerDataset(tok, max_length=32, padding="max_length").load(csv)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    client = FedAvgClient(
        ctx=ctx,
        model=model or tiny_gpt2(seed),
        fed_args=fed_args,
        training_args=args,
        train_set=train,
        tokenizer=tok,
        update_transforms=update_transforms,
        **client_kwargs,
    )
    before = Before(client)
    client.callback_handler.callbacks.insert(client.callback_handler.callbacks.index(client.fed_sync), before)
    after = After(client)
    client.add_callback(after)
    return client, before, after
