"""``fedfleet offsite job.yaml`` (or ``python -m fedfleet.cli.offsite job.yaml``): run one side of an
Offsite-Tuning job; prints one JSON summary. Mutual TLS from the YAML's ``certs`` folder; plaintext only with
``--insecure`` on the command line (a YAML's ``insecure: true`` alone is refused).

The model owner (role arbiter) hands out the sub model, aggregates the adapters and saves the plugged-in full
model; a data owner (guest / host) receives the sub model, tunes the adapters on its share of the data and prints
the paper's table rows it can compute (emulator zero-shot, emulator fine-tuned) on the held-out split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedfleet.config.offsite import OffsiteJob, load_job


def run_owner(job: OffsiteJob, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    from fedfleet.offsite.models import AutoMainModel
    from fedfleet.offsite.session import OffsiteTuningServer

    p = job.offsite
    source = job.model_path or job.model_config()
    main = AutoMainModel(
        source, p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num, seed=job.seed
    )
    distilled = distill(job, main) if job.distill is not None else {}
    server = OffsiteTuningServer(ctx, main, lora=job.lora, fed_args=job.fed, handout_at=job.handout_address)
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
        **distilled,
    }


def distill(job: OffsiteJob, main: Any) -> dict[str, Any]:
    """Distil the emulator on public text (job.distill) and say how much closer to the full middle it came."""
    import torch

    from fedfleet.hf.data import gpt2_tokenizer
    from fedfleet.offsite.data import LmBlocks, review_texts
    from fedfleet.offsite.distill import distill_emulator, emulator_gap
    from fedfleet.offsite.models import AutoSubModel

    d, p = job.distill, job.offsite
    assert d is not None
    texts = review_texts(seed=d.seed)[-d.texts :]  # the far end: not the data owners' texts
    held = max(1, len(texts) // 10)
    tok = gpt2_tokenizer()
    train, test = LmBlocks(tok, texts[held:], d.block), LmBlocks(tok, texts[:held], d.block)

    def batches(blocks: LmBlocks, epochs: int = 1) -> Any:
        gen = torch.Generator().manual_seed(d.seed)
        for _ in range(epochs):
            order = torch.randperm(len(blocks), generator=gen)
            for chunk in order.split(d.batch_size):
                yield {"input_ids": blocks.ids[chunk]}

    sub = AutoSubModel(main.model.config, p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num)
    before = emulator_gap(main, sub, batches(test))
    say = f"distilling the emulator on {len(train)} blocks of public text x {d.epochs} epoch(s)"
    print(say, file=sys.stderr, flush=True)
    losses = distill_emulator(main, sub, batches(train, d.epochs), lr=d.lr)
    after = emulator_gap(main, sub, batches(test))
    print(f"emulator gap on held-out text: {before:.4g} -> {after:.4g}", file=sys.stderr, flush=True)
    return {"emulator_gap_before": before, "emulator_gap_after": after, "distill_steps": len(losses)}


def run_data_owner(job: OffsiteJob, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import save_file
    from transformers import TrainingArguments

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
        fed_args=job.fed,
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


def offsite_command(job_path: str, *, dry_run: bool = False, insecure: bool = False) -> int:
    """Run this side of the job and print its JSON summary; a :class:`~fedfleet.errors.UserError` (a bad key
    or value, a party that is not in ``parties``, ``insecure: true`` without ``insecure``) is raised for the
    command line to report. ``insecure``: the command line's --insecure, the only way to plaintext."""
    from fedfleet.errors import ConfigError
    from fedfleet.sync.context import create_context

    job = load_job(job_path)
    try:
        certs = job.certs_for(insecure)
    except ConfigError as exc:
        raise ConfigError(f"{job_path}: {exc}") from None
    ctx = create_context((job.role, job.party_id), job.parties, job.session, job.address, certs, insecure=certs is None)
    if dry_run:
        import yaml

        from fedfleet.config import to_dict

        job.model_config()  # model_type and its keys are checked by transformers
        print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
        return 0
    summary = run_owner(job, ctx) if ctx.is_arbiter else run_data_owner(job, ctx)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":  # the same command, errors reported the same way: `fedfleet: error: ...`, exit 2
    from fedfleet.cli.main import main

    sys.exit(main(["offsite", *sys.argv[1:]]))
