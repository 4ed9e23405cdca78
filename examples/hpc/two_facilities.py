"""Two facilities fine-tune one LLaMA-shaped model, each as an FSDP group of 2 CPU ranks, on their own offline text.

The xFFL set-up in miniature, on one machine (docs/coming-from-xffl.md):
- facility A trains on product reviews, facility B on MMLU questions with worked answers (both ship in wheels);
- each tokenises its text where it lives (``tokenize_corpus``, the code of ``fedfleet tokenize``) and reads the
  blocks offline (``TokenBlocks``);
- each is an ``FSDPParty`` of 2 ranks (gloo; A with _HYBRID_SHARD_ZERO2, B with HYBRID_SHARD), started with the
  variables
  torchrun would set; an arbiter folds their updates every ``--sync-steps`` optimizer steps;
- held-out perplexity on each facility's own held-out text: before training, after training alone (a session of
  that facility only: the same steps, the same code), and after federated training; and on the other facility's
  held-out text, which a facility alone never saw;
- each facility then saves its model as a half-precision Hugging Face checkpoint (``save_hf_checkpoint``).

    python examples/hpc/two_facilities.py            # about 2 minutes on 2 CPU cores
    python examples/hpc/two_facilities.py --quick    # under a minute: fewer documents and steps

The last line printed is JSON with every perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# as in the guide: the facility with more GPU memory takes _HYBRID_SHARD_ZERO2, the other HYBRID_SHARD
FACILITIES = {"A": ("guest", "9999", "_HYBRID_SHARD_ZERO2"), "B": ("host", "10000", "HYBRID_SHARD")}
SEQ, BATCH, LR = 32, 4, 3e-3
RANKS = 2


# -- the driver: data, then three sessions, then the table -------------------------------------------------
def drive(work: Path, quick: bool) -> dict:
    from fedfleet.hf.data import gpt2_tokenizer, mmlu_questions, read_reviews, tokenize_corpus

    docs = 90 if quick else 280  # MMLU has 281 questions: B's documents; A takes as many reviews
    texts = {
        "A": [t.replace("\n", " ") for t in read_reviews()[0][:docs]],
        "B": [(q.prompt + q.answer).replace("\n", " ") for q in mmlu_questions()[:docs]],
    }
    tokenizer = gpt2_tokenizer()
    for site, lines in texts.items():
        held = len(lines) // 10  # the last tenth is the facility's held-out text
        for part, rows in (("train", lines[:-held]), ("heldout", lines[-held:])):
            src = work / f"{site}-{part}.txt"
            src.write_text("\n".join(rows) + "\n", encoding="utf-8")
            tokenize_corpus([src], tokenizer, work / f"{site}-{part}", seq_len=SEQ, overwrite=True)
    steps = 30 if quick else 120
    results: dict = {}
    for session, sites in (("federated", ["A", "B"]), ("A-alone", ["A"]), ("B-alone", ["B"])):
        started = time.monotonic()
        results[session] = run_session(work, session, sites, steps)
        print(f"{session}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    table = {
        site: {
            "before": results["federated"][site]["before"],
            "alone": results[f"{site}-alone"][site]["after"],
            "federated": results["federated"][site]["after"],
            "other_text_alone": results[f"{site}-alone"][site]["after_other"],
            "other_text_federated": results["federated"][site]["after_other"],
        }
        for site in FACILITIES
    }
    print("held-out perplexity    own text: before   alone  federated   other facility's text: alone  federated")
    for site, row in table.items():
        print(
            f"facility {site} {row['before']:22.1f} {row['alone']:7.1f} {row['federated']:10.1f} "
            f"{row['other_text_alone']:36.1f} {row['other_text_federated']:10.1f}"
        )
    return {"steps": steps, "sync_steps": steps // 6, "perplexity": table}


def run_session(work: Path, session: str, sites: list[str], steps: int) -> dict:
    """The arbiter and every rank of every site as processes of their own; each site's rank 0 reports."""
    address = f"127.0.0.1:{_free_port()}"
    out = work / session
    out.mkdir(exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--address", address, "--session", session, "--sites", ",".join(sites), "--steps", str(steps)]
    procs = [subprocess.Popen([*me, "arbiter", *common])]
    for site in sites:
        port = str(_free_port())
        for rank in range(RANKS):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank))
            env.update(WORLD_SIZE=str(RANKS), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(RANKS), OMP_NUM_THREADS="1")
            cmd = [*me, "rank", *common, "--site", site, "--work", str(work), "--out", str(out)]
            procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait(timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise SystemExit(f"{session}: a process failed (exit codes {codes})")
    return {site: json.loads((out / f"{site}.json").read_text()) for site in sites}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parties(sites: list[str]) -> list[tuple[str, str]]:
    return [FACILITIES[s][:2] for s in sites] + [("arbiter", "1")]


# -- the arbiter: no model, no data --------------------------------------------------------------------------
def arbiter(a: argparse.Namespace) -> None:
    from fedfleet.sync import FedAvgServer, create_context

    parties = _parties(a.sites.split(","))
    ctx = create_context(parties[-1], parties, a.session, a.address, insecure=True)
    FedAvgServer(ctx).train()


# -- one rank of one facility --------------------------------------------------------------------------------
def rank(a: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import Subset
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedfleet.hf.data import TokenBlocks, gpt2_tokenizer
    from fedfleet.hpc.fsdp import FSDPConfig
    from fedfleet.hpc.fsdp_party import FSDPParty
    from fedfleet.hpc.hf_save import save_hf_checkpoint
    from fedfleet.sync import FedArguments, create_context

    role, pid, strategy = FACILITIES[a.site]
    ctx = create_context((role, pid), _parties(a.sites.split(",")), a.session, a.address, insecure=True)
    tokenizer = gpt2_tokenizer()
    train = TokenBlocks(Path(a.work) / f"{a.site}-train", tokenizer)
    heldout = TokenBlocks(Path(a.work) / f"{a.site}-heldout", tokenizer)
    other = TokenBlocks(Path(a.work) / f"{'B' if a.site == 'A' else 'A'}-heldout", tokenizer)
    examples = a.steps * BATCH * RANKS  # the same steps at every facility: they plan the same syncs
    train = Subset(train, [i % len(train) for i in range(examples)])
    torch.manual_seed(0)  # every rank of every facility starts from the same weights
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True,
    )  # fmt: skip
    fsdp = FSDPConfig(strategy, precision="fp32")  # hybrid: shard within the node's 2 ranks
    party = FSDPParty(ctx, LlamaForCausalLM(config), FedArguments("step", max(1, a.steps // 6)), fsdp)
    before = perplexity(party, heldout)
    party.fit(train, epochs=1, batch_size=BATCH, lr=LR)
    after, after_other = perplexity(party, heldout), perplexity(party, other)
    save_hf_checkpoint(party.model, Path(a.out) / f"{a.site}-checkpoint", dtype="bf16", tokens=examples * SEQ)
    if party.is_main:
        report = {"before": before, "after": after, "after_other": after_other, "syncs": len(party.history)}
        (Path(a.out) / f"{a.site}.json").write_text(json.dumps(report))
    party.destroy()


def perplexity(party, data) -> float:
    """exp(mean next-token loss) over ``data``, each rank a slice, summed across the party's ranks."""
    import torch
    import torch.distributed as dist

    party.model.eval()
    world, me = dist.get_world_size(), dist.get_rank()
    n = len(data) // world * world  # every rank the same number of forwards: FSDP's are collectives
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(me, n, world * BATCH):
            ids = torch.stack([data[i]["input_ids"] for i in range(start, min(start + world * BATCH, n), world)])
            total += torch.tensor([float(party.model(input_ids=ids, labels=ids).loss) * len(ids), len(ids)])
    dist.all_reduce(total)
    party.model.train()
    return math.exp(total[0] / total[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("arbiter", "rank"):  # the processes the driver starts
        internal = argparse.ArgumentParser()
        for name in ("--address", "--session", "--sites", "--site", "--work", "--out"):
            internal.add_argument(name)
        internal.add_argument("--steps", type=int)
        (arbiter if sys.argv[1] == "arbiter" else rank)(internal.parse_args(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer documents and steps")
    p.add_argument("--work", default="runs/two-facilities", help="where the corpora and checkpoints go")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(drive(work, a.quick)))


if __name__ == "__main__":
    main()
    from fedfleet.sync import end_process_group

    end_process_group()  # every rank, last: the process group freed before the interpreter's exit
