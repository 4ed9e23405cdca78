"""``python -m fedfleet.offsite.cli job.yaml``: run one side of an Offsite-Tuning job; prints one JSON summary.

The model owner (role arbiter) hands out the sub model, aggregates the adapters and saves the plugged-in full
model; a data owner (guest / host) receives the sub model, tunes the adapters on its share of the data and prints
the paper's table rows it can compute (emulator zero-shot, emulator fine-tuned) on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedfleet.errors import UserError
from fedfleet.offsite.config import OffsiteJob, load_job


def run_owner(job: OffsiteJob, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    from fedfleet.hf.args import FedArguments
    from fedfleet.offsite.models import AutoMainModel
    from fedfleet.offsite.session import OffsiteTuningServer

    p = job.offsite
    source = job.model_path or job.model_config()
    main = AutoMainModel(
        source, p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num, seed=job.seed
    )
    server = OffsiteTuningServer(
        ctx, main, lora=job.lora, fed_args=FedArguments(**vars(job.fed)), handout_at=job.handout_address
    )
    history = server.train()
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in main.get_submodel_weights(with_emulator=False).items()},
        out / "adapters.safetensors",
    )
    main.model.save_pretrained(out / "plugged_in")
    return {
        "role": "owner",
        "rounds": len(history),
        "handout_tensors": len(server.handout.spec),
        "handout_numel": server.handout.numel,
        "main_numel": sum(t.numel() for t in main.model.parameters()),
    }


def run_data_owner(job: OffsiteJob, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    from fedfleet.hf.args import FedArguments
    from fedfleet.hf.data import gpt2_tokenizer
    from fedfleet.offsite.data import LmBlocks, review_texts, split
    from fedfleet.offsite.evaluate import perplexity
    from fedfleet.offsite.models import AutoSubModel
    from fedfleet.offsite.session import OffsiteTuningClient

    p, d, t = job.offsite, job.data, job.training
    sub = AutoSubModel(job.model_config(), p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num)
    tok = gpt2_tokenizer()
    shares, test = split(review_texts(d.texts, seed=d.seed), d.shares, d.held_out)
    train, held_out = LmBlocks(tok, shares[d.share], d.block), LmBlocks(tok, test, d.block)
    sub_numel = sum(q.numel() for q in sub.model.parameters())  # before LoRA adds its factors
    out = Path(job.output)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=t.seed,
        disable_tqdm=True,
        deepspeed=t.deepspeed,
        use_cpu=not _has_gpu(),
    )
    client = OffsiteTuningClient(
        ctx,
        sub,
        lora=job.lora,
        handout_at=job.handout_address,
        training_args=args,
        train_set=train,
        tokenizer=tok,
        fed_args=FedArguments(**vars(job.fed)),
    )
    zero_shot = perplexity(client.model, held_out)
    client.train()
    losses = [e["loss"] for e in client.state.log_history if "loss" in e]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in client.received.tensors().items()}, out / "received.safetensors")
    return {
        "role": "data_owner",
        "syncs": client.fed_sync.syncs,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "received_numel": client.received.numel,
        "sub_numel": sub_numel,
        "emulator_zero_shot_ppl": zero_shot,
        "emulator_fine_tuned_ppl": perplexity(client.model, held_out),
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfleet-offsite", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="this side's YAML")
    args = parser.parse_args(argv)
    try:
        from fedfleet.hf.context import create_context

        job = load_job(args.job)
        ctx = create_context(
            (job.role, job.party_id), job.parties, job.session, job.address, job.certs, insecure=job.insecure
        )
        summary = run_owner(job, ctx) if ctx.is_arbiter else run_data_owner(job, ctx)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
