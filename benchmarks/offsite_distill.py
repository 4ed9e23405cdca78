"""Offsite-Tuning with the layer-drop emulator vs the distilled one, side by side: the paper's table rows.

A small GPT-2 shape is first pre-trained on "public" review text (so its middle blocks do something a
compressed emulator can miss), then, for each emulator: the data owner tunes the adapters against it on its
own texts (plain AdamW, the same steps and seed in both arms), and the owner plugs them into the full model.
Perplexity on held-out texts for the paper's rows (full zero-shot, emulator zero-shot, emulator fine-tuned,
plug-in). The claim tested: a distilled emulator makes the plug-in better (the paper's Table 4), reported as the
ratio of plug-in perplexities. Nothing is downloaded: GPT-2's BPE and the reviews come from wheels.

    python benchmarks/offsite_distill.py            # 8 blocks, hidden 128
    python benchmarks/offsite_distill.py --quick    # 6 blocks, hidden 64 (< 2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fedfleet.hf.data import gpt2_tokenizer
from fedfleet.offsite import AutoMainModel, AutoSubModel, distill_emulator, emulator_gap
from fedfleet.offsite.data import LmBlocks, review_texts
from fedfleet.offsite.evaluate import perplexity


@dataclass(frozen=True)
class Setup:
    layers: int
    hidden: int
    emulator: int
    public_texts: int  # the owner's: pre-training and distillation
    owner_texts: int  # the data owner's: adapter tuning
    held_out: int
    pretrain_steps: int
    distill_epochs: int
    tune_steps: int
    block: int = 64
    batch: int = 8


FULL = Setup(8, 128, 2, 3000, 600, 150, 400, 2, 150)
# GPT-2's 50k-token LM head dominates a step of so small a model: the quick shape uses short blocks, few steps
QUICK = Setup(6, 64, 2, 600, 200, 40, 50, 1, 40, block=32)


def batches(blocks: LmBlocks, size: int, steps: int | None, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches, epoch after epoch, ``steps`` in all (None: one epoch)."""
    gen, done = torch.Generator().manual_seed(seed), 0
    while steps is None or done < steps:
        for chunk in torch.randperm(len(blocks), generator=gen).split(size):
            if steps is not None and done == steps:
                return
            yield {"input_ids": blocks.ids[chunk]}
            done += 1
        if steps is None:
            return


def train_lm(model: torch.nn.Module, data: Iterator[dict[str, torch.Tensor]], lr: float) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for batch in data:
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def arm(main: AutoMainModel, s: Setup, own: LmBlocks, test: LmBlocks, public: LmBlocks | None) -> dict[str, float]:
    """Tune adapters against ``main``'s emulator (distilled on ``public`` text, or the layer drop without it),
    plug them in; the table's rows."""
    main = copy.deepcopy(main)
    sub = AutoSubModel(main.model.config, s.emulator, 1, 1)
    out: dict[str, float] = {}
    if public is not None:
        start = time.perf_counter()
        before = emulator_gap(main, sub, batches(test, s.batch, None, 0))
        distill_emulator(main, sub, batches(public, s.batch, s.distill_epochs * -(-len(public) // s.batch), 2), 1e-3)
        out.update(gap_before=before, distill_s=time.perf_counter() - start)
    out["emulator_gap"] = emulator_gap(main, sub, batches(test, s.batch, None, 0))
    sub.load_submodel_weights(main.get_submodel_weights())
    out["emulator zero-shot"] = perplexity(sub.model, test)
    torch.manual_seed(3)
    train_lm(sub.model, batches(own, s.batch, s.tune_steps, 3), 1e-3)
    out["emulator fine-tuned"] = perplexity(sub.model, test)
    main.load_submodel_weights(sub.get_submodel_weights())
    out["plug-in"] = perplexity(main.model, test)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller shape and fewer steps, < 2 min on 2 cores")
    args = p.parse_args()
    s = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # small ops: see benchmarks/threads.py
    tok = gpt2_tokenizer()
    texts = review_texts(seed=0)
    # the owner's public text is the far end of the shuffled reviews; the data owner's texts the near end
    own = LmBlocks(tok, texts[s.held_out : s.held_out + s.owner_texts], s.block)
    test = LmBlocks(tok, texts[: s.held_out], s.block)
    public = LmBlocks(tok, texts[-s.public_texts :], s.block)
    config = GPT2Config(
        n_layer=s.layers, n_embd=s.hidden, n_head=4, n_positions=s.block, vocab_size=len(tok),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    start = time.perf_counter()
    train_lm(model, batches(public, s.batch, s.pretrain_steps, 1), 1e-3)
    pretrain_s = time.perf_counter() - start
    main_model = AutoMainModel(model, s.emulator, 1, 1)
    full = perplexity(main_model.model, test)
    rows = {"layer drop": arm(main_model, s, own, test, None), "distilled": arm(main_model, s, own, test, public)}
    print(f"{'emulator':12s} {'full 0-shot':>12s} {'emu 0-shot':>12s} {'emu tuned':>12s} {'plug-in':>12s} {'gap':>8s}")
    for name, r in rows.items():
        print(
            f"{name:12s} {full:12.1f} {r['emulator zero-shot']:12.1f} {r['emulator fine-tuned']:12.1f} "
            f"{r['plug-in']:12.1f} {r['emulator_gap']:8.4f}"
        )
    ratio = rows["layer drop"]["plug-in"] / rows["distilled"]["plug-in"]
    summary = {
        "benchmark": "offsite_distill",
        "quick": args.quick,
        "setup": asdict(s),
        "pretrain_s": round(pretrain_s, 1),
        "full_zero_shot_ppl": full,
        "rows": rows,
        "plug_in_ppl_layer_drop_over_distilled": round(ratio, 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
