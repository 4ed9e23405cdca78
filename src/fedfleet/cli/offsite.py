"""``fedfleet offsite job.yaml`` (or ``python -m fedfleet.cli.offsite job.yaml``): run one side of an
Offsite-Tuning job; prints one JSON summary. Mutual TLS from the YAML's ``certs`` folder; plaintext only with
``--insecure`` on the command line (a YAML's ``insecure: true`` alone is refused).

The model owner (role arbiter) hands out the sub model, aggregates the adapters and saves the plugged-in full
model; a data owner (guest / host) receives the sub model, tunes the adapters on its share of the data (review
texts or MMLU QA, ``data.source``) and prints the paper's table rows it can compute (emulator zero-shot, emulator
fine-tuned) on the held-out split. ``--dry-run`` builds what the run builds, up to the first connection.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet.config.offsite import OffsiteJob, load_job
from fedfleet.errors import ConfigError


def build_main(job: OffsiteJob) -> Any:
    """The owner's main model, as the run and ``--dry-run`` build it: from ``model_path`` (a ``save_pretrained``
    folder) or the ``model`` config (random weights, seeded)."""
    from fedfleet.offsite.models import AutoMainModel

    p = job.offsite
    source = job.model_path or job.model_config()
    return AutoMainModel(
        source, p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num, seed=job.seed
    )


def owner_server(job: OffsiteJob, ctx: Any, main: Any) -> Any:
    from fedfleet.offsite.session import OffsiteTuningServer

    return OffsiteTuningServer(ctx, main, lora=job.lora, fed_args=job.fed, handout_at=job.handout_address)


def run_owner(job: OffsiteJob, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    main = build_main(job)
    distilled = distill(job, main) if job.distill is not None else {}
    server = owner_server(job, ctx, main)  # after distilling: the hand-out is fixed when the server is made
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


@dataclass
class DataOwnerParts:
    """What a data owner's run builds before it dials the owner (``--dry-run`` builds the same and stops)."""

    sub: Any
    client_kwargs: dict[str, Any]  # OffsiteTuningClient's training_args, train_set, tokenizer, data_collator, fed_args
    metric: str  # what ``evaluate`` measures: ppl (review blocks) or acc (MMLU multiple choice)
    evaluate: Callable[[Any], float]  # of a model, on the held-out split


def build_data_owner(job: OffsiteJob) -> DataOwnerParts:
    from transformers import TrainingArguments

    from fedfleet.hf.data import gpt2_tokenizer
    from fedfleet.offsite.models import AutoSubModel

    p, t = job.offsite, job.training
    config = job.model_config()
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and job.data.block > positions:
        raise ConfigError(f"data.block: {job.data.block} tokens, but the model reads at most {positions} positions")
    sub = AutoSubModel(config, p.emulator_layer_num, p.adapter_top_layer_num, p.adapter_bottom_layer_num)
    tok = gpt2_tokenizer()
    data = DATA_SOURCES[job.data.source](job, tok)
    args = TrainingArguments(
        output_dir=job.output,
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
    kwargs = {"training_args": args, "tokenizer": tok, "fed_args": job.fed, **data.pop("client")}
    return DataOwnerParts(sub, kwargs, **data)


def _review_blocks(job: OffsiteJob, tok: Any) -> dict[str, Any]:
    """Review texts as language-model blocks; the table's metric is the held-out perplexity."""
    from fedfleet.offsite.data import LmBlocks, review_texts, split
    from fedfleet.offsite.evaluate import perplexity

    d = job.data
    shares, test = split(review_texts(d.texts, seed=d.seed), d.shares, d.held_out)
    held_out = LmBlocks(tok, test, d.block)
    return {
        "client": {"train_set": LmBlocks(tok, shares[d.share], d.block)},
        "metric": "ppl",
        "evaluate": lambda model: perplexity(model, held_out),
    }


def _mmlu_qa(job: OffsiteJob, tok: Any) -> dict[str, Any]:
    """MMLU questions and answers (the loss on the answer only); the metric is held-out multiple-choice accuracy."""
    import torch

    from fedfleet.hf.data import QaDataset, Seq2SeqCollator, mmlu_questions
    from fedfleet.offsite.data import split
    from fedfleet.offsite.evaluate import choice_accuracy

    d = job.data
    answer = len(tok(" The answer is (A).")["input_ids"])  # what choice_accuracy appends to each prompt
    if d.block <= answer:
        raise ConfigError(f"data.block: {d.block} tokens leave no room for a question beside its {answer}-token answer")
    pairs = mmlu_questions(reasoning=d.reasoning)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(d.seed)).tolist()
    shares, test = split([pairs[i] for i in order[: d.texts]], d.shares, d.held_out)
    return {
        "client": {
            "train_set": QaDataset(tok, shares[d.share], max_length=d.block),
            "data_collator": Seq2SeqCollator.for_tokenizer(tok),
        },
        "metric": "acc",
        "evaluate": lambda model: choice_accuracy(model, tok, test, max_prompt=d.block - answer),
    }


DATA_SOURCES: dict[str, Callable[[OffsiteJob, Any], dict[str, Any]]] = {"reviews": _review_blocks, "mmlu": _mmlu_qa}


def run_data_owner(job: OffsiteJob, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    from fedfleet.offsite.session import OffsiteTuningClient

    parts = build_data_owner(job)
    sub_numel = sum(q.numel() for q in parts.sub.model.parameters())  # before LoRA adds its factors
    client = OffsiteTuningClient(ctx, parts.sub, lora=job.lora, handout_at=job.handout_address, **parts.client_kwargs)
    zero_shot = parts.evaluate(client.model)
    client.train()
    losses = [e["loss"] for e in client.state.log_history if "loss" in e]
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in client.received.tensors().items()}, out / "received.safetensors")
    return {
        "role": "data_owner",
        "syncs": client.fed_sync.syncs,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "received_numel": client.received.numel,
        "sub_numel": sub_numel,
        f"emulator_zero_shot_{parts.metric}": zero_shot,
        f"emulator_fine_tuned_{parts.metric}": parts.evaluate(client.model),
    }


def build_side(job: OffsiteJob, ctx: Any) -> None:
    """Build what the run builds, up to the first connection: the owner's main model and server (its skeleton,
    LoRA), or the data owner's sub model, data and the checks its client makes before the hand-out."""
    if ctx.is_arbiter:
        owner_server(job, ctx, build_main(job))
        return
    from fedfleet.offsite.session import check_data_owner
    from fedfleet.offsite.tuning import tunable

    parts = build_data_owner(job)
    check_data_owner(parts.sub, job.lora, parts.client_kwargs)
    tunable(parts.sub, job.lora)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def offsite_command(job_path: str, *, dry_run: bool = False, insecure: bool = False) -> int:
    """Run this side of the job and print its JSON summary; a :class:`~fedfleet.errors.UserError` (a bad key
    or value, a party that is not in ``parties``, ``insecure: true`` without ``insecure``) is raised for the
    command line to report. ``insecure``: the command line's --insecure, the only way to plaintext."""
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

        build_side(job, ctx)
        print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
        return 0
    summary = run_owner(job, ctx) if ctx.is_arbiter else run_data_owner(job, ctx)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":  # the same command, errors reported the same way: `fedfleet: error: ...`, exit 2
    from fedfleet.cli.main import main

    sys.exit(main(["offsite", *sys.argv[1:]]))
