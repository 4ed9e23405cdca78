"""HF and Lightning parties sharing a CPU: torch's default threads (one per core) vs fedfleet's rule, side by side.

Issue 14 item 16: parties with torch's default threads ran 2.4-13x slower on a shared CPU. fedfleet's rule
(``fedfleet.sync.threads``, the simulation's): on a CPU a model under 10M params trains with one thread. Both
sides train the same parties on the same data; only the thread count differs (``threads=`` set to torch's
default vs left to the rule). Scenarios, two data owners each:

- ``hf-grpc``: FATE-LLM's GPT-2 job in the example's tiny shape (3.3M params, 64 tokens, batch 16): an arbiter
  and two ``FedAvgClient`` parties as three processes on this machine, plaintext gRPC on loopback;
- ``hf-local``: the same parties in this process (``LocalFederation``, taking turns);
- ``lightning-grpc`` / ``lightning-local``: the Lightning guide's IMDB transformer shrunk to the same size
  (embeddings, 2 encoder layers, mean over tokens, a linear head) with ``FedLightningCallback``.

The figure is the slower party's ``train()``/``fit()`` time (the start-up of processes excluded), median over
``--repeats`` interleaved runs (the sides take turns going first; in-process scenarios after one untimed run);
the ratio is default / rule (> 1: the rule is faster). ``--busy`` adds a process
that keeps one core busy, as another job on the machine would.

    python benchmarks/party_threads.py             # 3 repeats, 640 reviews per party
    python benchmarks/party_threads.py --quick     # 1 repeat, 192 reviews per party (< 2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from common import load_average, log, median

SCENARIOS = ("hf-grpc", "hf-local", "lightning-grpc", "lightning-local")
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, read before anything changes it


# -- the parties ---------------------------------------------------------------------------------------------
def hf_party(ctx: Any, csv: str, seed: int, threads: int | None, out: Path) -> Any:
    from transformers import GPT2Config, GPT2ForSequenceClassification, TrainingArguments

    from fedfleet.hf import FedArguments, FedAvgClient
    from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_embd": 64, "n_head": 2}  # examples/hf/gpt2_sentiment.py --size tiny
    model = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=len(tok), n_positions=64, num_labels=2, pad_token_id=tok.pad_token_id, **shape)
    )
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    train = TokenizerDataset(tok, max_length=64, padding="max_length").load(csv)
    return FedAvgClient(
        ctx=ctx, model=model, fed_args=FedArguments("epoch", 1), training_args=args, train_set=train, threads=threads
    )


def lightning_party(ctx: Any, csv: str, seed: int, threads: int | None) -> tuple[Any, Any, Any]:
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer
    from fedfleet.lightning import FedArguments, FedLightningCallback

    class ReviewTransformer(pl.LightningModule):
        """The Lightning guide's IMDB transformer, shrunk: (B, T) token ids -> (B, 2) logits."""

        def __init__(self, vocab: int, dim: int = 64, layers: int = 2) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
            layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(dim, 2)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
            x = self.encoder(x, src_key_padding_mask=mask == 0)
            return self.head((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            ids, mask, y = batch
            return nn.functional.cross_entropy(self(ids, mask), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    tok = gpt2_tokenizer()
    data = TokenizerDataset(tok, max_length=64, padding="max_length").load(csv)
    rows = TensorDataset(data.features["input_ids"], data.features["attention_mask"], data.labels)
    loader = DataLoader(rows, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    callback = FedLightningCallback(ctx, FedArguments("epoch", 1), seed=seed, threads=threads)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer, ReviewTransformer(len(tok)), loader


def train(kind: str, ctx: Any, csv: str, seed: int, threads: int | None, out: Path) -> float:
    """Build one party, train it; the seconds its training took (its syncs, waiting for the other, included)."""
    if kind == "hf":
        party = hf_party(ctx, csv, seed, threads, out)
        start = time.perf_counter()
        party.train()
    else:
        trainer, module, loader = lightning_party(ctx, csv, seed, threads)
        start = time.perf_counter()
        trainer.fit(module, loader)
    return time.perf_counter() - start


# -- the scenarios -------------------------------------------------------------------------------------------
PARTIES = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]


def worker(argv: list[str]) -> None:
    """One process of a gRPC scenario: ``--worker KIND ROLE ADDRESS SESSION THREADS CSV OUT``."""
    from fedfleet.hf import FedAvgServer, create_context

    kind, role, address, session, threads, csv, out = argv
    pid = dict(PARTIES[:2])[role] if role != "arbiter" else "10000"
    ctx = create_context((role, pid), PARTIES, session, address, insecure=True)
    if role == "arbiter":
        FedAvgServer(ctx).train()
        return
    seconds = train(kind, ctx, csv, 0 if role == "guest" else 1, int(threads) or None, Path(out))
    print(json.dumps({"seconds": seconds}), flush=True)


def over_grpc(kind: str, threads: int | None, csvs: list[Path], out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address, session = f"127.0.0.1:{port}", f"bench-{time.monotonic_ns()}"
    script = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    tail = [address, session, str(threads or 0)]
    procs = [subprocess.Popen([*script, "arbiter", *tail, "-", str(out)], stdout=subprocess.DEVNULL)]
    for role, csv in zip(("guest", "host"), csvs, strict=True):
        cmd = [*script, role, *tail, str(csv), str(out / role)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    seconds = []
    for p in procs[1:]:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"a {kind} party failed (exit {p.returncode})")
        seconds.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    procs[0].wait(timeout=60)
    return max(seconds)


def in_process(kind: str, threads: int | None, csvs: list[Path], out: Path) -> float:
    from fedfleet.hf import LocalFederation

    fed = LocalFederation(2)
    seconds: list[float] = [0.0, 0.0]
    if kind == "hf":  # HF parties are built in one thread (fedfleet.hf.inprocess), then train in their own
        parties = [hf_party(fed.context(i), str(csvs[i]), i, threads, out / str(i)) for i in range(2)]
        jobs = [lambda p=p, i=i: seconds.__setitem__(i, timed(p.train)) for i, p in enumerate(parties)]
    else:
        built = [lightning_party(fed.context(i), str(csvs[i]), i, threads) for i in range(2)]
        jobs = [lambda b=b, i=i: seconds.__setitem__(i, timed(lambda: b[0].fit(*b[1:]))) for i, b in enumerate(built)]
    ts = [threading.Thread(target=job) for job in jobs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    return max(seconds)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _busy(stop: Any) -> None:
    x = 0
    while not stop.is_set():  # pure Python: holds one core, no threads of its own
        x = (x * 31 + 7) % 1_000_003


def main() -> None:
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1 :])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat, fewer reviews")
    p.add_argument("--repeats", type=int, default=None, help="runs per side (default 3, quick 1)")
    p.add_argument("--reviews", type=int, default=None, help="reviews per party (default 640, quick 192)")
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--busy", action="store_true", help="one more process keeps a core busy throughout")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    reviews = args.reviews or (192 if args.quick else 640)

    import logging

    logging.disable(logging.WARNING)  # the Trainer's and Lightning's notices are not the result
    from fedfleet.hf.data import split_csv, write_reviews_csv

    work = Path(tempfile.mkdtemp(prefix="party-threads-"))
    csvs = split_csv(write_reviews_csv(work, limit=2 * reviews, seed=0), work / "split", 2, seed=0).parties
    load_start = load_average()
    stop = mp.Event()
    neighbour = mp.Process(target=_busy, args=(stop,), daemon=True) if args.busy else None
    if neighbour is not None:
        neighbour.start()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in args.scenarios:
            kind, where = name.split("-")
            run = over_grpc if where == "grpc" else in_process
            times: dict[str, list[float]] = {"default": [], "rule": []}
            if where == "local":  # the first run in this process pays the lazy imports and first calls
                run(kind, None, csvs, work / f"{name}-warm-up")
            sides = [("default", DEFAULT_THREADS), ("rule", None)]
            for r in range(repeats):
                for side, threads in sides if r % 2 == 0 else sides[::-1]:  # neither side always goes first
                    times[side].append(run(kind, threads, csvs, work / f"{name}-{side}-{r}"))
            d, rule = median(times["default"]), median(times["rule"])
            results[name] = {"default_s": round(d, 2), "rule_s": round(rule, 2), "default_vs_rule": round(d / rule, 2)}
            log(
                f"{name:16s} {DEFAULT_THREADS} threads (torch's default) {d:6.2f} s | rule (1 thread) {rule:6.2f} s "
                f"| x{d / rule:.2f}"
            )
    finally:
        stop.set()
        if neighbour is not None:
            neighbour.join()
    print(
        json.dumps(
            {
                "benchmark": "party_threads",
                "quick": args.quick,
                "busy": args.busy,
                "repeats": repeats,
                "reviews_per_party": reviews,
                "machine": f"{platform.machine()}, torch {torch.__version__}, {DEFAULT_THREADS} threads by default",
                "load_avg_1min": {"start": load_start, "end": load_average()},
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
