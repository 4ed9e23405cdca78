"""The DeepSpeed cases of tests/hf/test_hf_in_process.py, each in a fresh process with no launcher variables.

python -m tests.hf_inprocess_deepspeed CASE FOLDER     # the last stdout line is JSON
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path

from transformers import TrainingArguments

from fedfleet.hf import FedArguments, FedAvgClient, LocalFederation
from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer
from fedfleet.hf.ds_config import zero_config
from tests.hf_parties import review_shares, tiny_gpt2

# the FATE-LLM GPT-2 tutorial's ds_config with a WarmupLR of its own numbers, as users adapt it: its batch, Adam
# learning rate and warm-up disagree with the TrainingArguments below (batch 8, learning rate 2e-3, no warm-up)
FATE_CONFIG = {
    "train_micro_batch_size_per_gpu": 16,
    "train_batch_size": "auto",
    "optimizer": {"type": "Adam", "params": {"lr": 5e-4}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 500}},
    "fp16": {"enabled": False},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
}


def client(fed: LocalFederation, index: int, folder: Path, deepspeed: dict | None, batch: int = 8) -> FedAvgClient:
    tok = gpt2_tokenizer()
    csv = review_shares(folder / "data", fed.size, reviews=32)[index]
    args = TrainingArguments(
        output_dir=str(folder / f"party{index}"),
        max_steps=2,
        per_device_train_batch_size=batch,
        learning_rate=2e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=index,
        deepspeed=deepspeed,
    )
    train = TokenizerDataset(tok, max_length=32, padding="max_length").load(csv)
    return FedAvgClient(
        ctx=fed.context(index),
        model=tiny_gpt2(index),
        fed_args=FedArguments("epoch", 1),
        training_args=args,
        train_set=train,
        tokenizer=tok,
    )


def facts(c: FedAvgClient) -> dict:
    config = c.args.hf_deepspeed_config.config if c.is_deepspeed_enabled else {}
    engine = c.model_wrapped
    return {
        "deepspeed": type(engine).__name__ == "DeepSpeedEngine",
        "access": type(c.fed_sync.access).__name__,
        "syncs": c.fed_sync.syncs,
        "scheduler": config.get("scheduler", {}).get("params"),
        "micro_batch": engine.train_micro_batch_size_per_gpu() if hasattr(engine, "zero_optimization") else None,
        "lr": config.get("optimizer", {}).get("params", {}).get("lr"),
    }


def alone(folder: Path) -> dict:
    c = client(LocalFederation(1), 0, folder, zero_config(2))
    c.train()
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**facts(c), "env": env}


def fate_warmup(folder: Path) -> dict:
    c = client(LocalFederation(1), 0, folder, FATE_CONFIG)
    c.train()
    return facts(c)


def two(folder: Path, plain_second: bool = False) -> dict:
    fed = LocalFederation(2, timeout=60)
    first = client(fed, 0, folder, zero_config(1))
    started = time.monotonic()
    try:
        client(fed, 1, folder, None if plain_second else zero_config(3), batch=4)
    except Exception as exc:
        error = str(exc)
    else:
        error = "not refused"
    try:
        first.train()
        other = "trained"
    except Exception as exc:
        other = str(exc)
    return {"error": error, "other": other, "seconds": time.monotonic() - started}


def mixed(folder: Path) -> dict:
    return two(folder, plain_second=True)


def after(folder: Path) -> dict:
    runs = []
    for deepspeed in (zero_config(2), None):
        c = client(LocalFederation(1), 0, folder, deepspeed)
        c.train()
        runs.append(facts(c)["deepspeed"])
    return {"runs": runs}


CASES = {"alone": alone, "fate-warmup": fate_warmup, "two": two, "mixed": mixed, "after": after}


def main() -> None:
    case, folder = sys.argv[1], Path(sys.argv[2])
    captured = io.StringIO()
    logging.getLogger("fedfleet").addHandler(logging.StreamHandler(captured))
    logging.getLogger("fedfleet").setLevel(logging.INFO)
    try:
        result = {"error": None, **CASES[case](folder)}
    except Exception as exc:  # the test shows what went wrong instead of a bare exit status
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({**result, "log": captured.getvalue()}), flush=True)


if __name__ == "__main__":
    main()
