"""One data owner of tests/e2e/test_hf_deepspeed.py: a FedAvgClient under DeepSpeed ZeRO (or none), run by torchrun.

Every rank records, around each sync, what DeepSpeed itself says the weights are, read independently of
fedfleet's exchange code: the fp32 master weights (``safe_get_full_fp32_param``) just before the sync and
just after it, and the model's own weights (what the forward pass uses and ``save_model`` writes) just
after it. To keep the files small a fixed strided sample of the flattened params is saved, the same
elements on every rank and party. ``<out>/<party>-rank<r>.pt`` holds them; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from fedfleet.hf import FedArguments, FedAvgClient, create_context
from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer
from fedfleet.hf.ds_config import zero_config
from tests.hf_parties import tiny_gpt2

STRIDE = 7  # keep every 7th element: ~230k of the tiny GPT-2's 1.6M params, every tensor represented


def master_weights(chosen: list[tuple[str, torch.nn.Parameter]]) -> torch.Tensor:
    """The optimizer's fp32 master weights, flattened (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    parts = []
    for _, p in chosen:
        full = safe_get_full_fp32_param(p)
        parts.append((p.data if full is None else full).reshape(-1).float())
    return torch.cat(parts)[::STRIDE].clone()


def model_weights(chosen: list[tuple[str, torch.nn.Parameter]]) -> torch.Tensor:
    """The model's own weights, flattened; under ZeRO-3 each is gathered from its partitions first."""
    parts = []
    for _, p in chosen:
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                parts.append(p.data.reshape(-1).float().clone())
        else:
            parts.append(p.data.reshape(-1).float().clone())
    return torch.cat(parts)[::STRIDE].clone()


class Recorder(TrainerCallback):
    """Installed on both sides of the sync callback (``phase`` "before" or "after")."""

    def __init__(self, client: FedAvgClient, phase: str, log: dict[str, list[torch.Tensor]]) -> None:
        self.client, self.phase, self.log = client, phase, log

    def chosen(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.client.model.named_parameters() if p.requires_grad]

    def record(self) -> None:
        if self.phase == "before":
            self.log["before"].append(master_weights(self.chosen()))
        else:
            self.log["after"].append(master_weights(self.chosen()))
            self.log["after_model"].append(model_weights(self.chosen()))

    def on_train_begin(self, args, state, control, **kw):
        if self.phase == "after":  # the common start, once the first party's params have been loaded
            self.record()

    def on_step_end(self, args, state, control, **kw):
        sync = self.client.fed_sync
        if self.phase == "before":
            if sync.due(state.global_step):
                self.record()
        elif sync.syncs > len(self.log["after"]) - 1:
            self.record()


PARTIES = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]


def build_client(
    role: str,
    pid: str,
    csv: str,
    out: str,
    address: str,
    stage: int,
    batch_size: int,
    offload: bool = False,
    aggregator: str = "plain",
) -> tuple[FedAvgClient, dict[str, list[torch.Tensor]]]:
    """A FedAvgClient (ZeRO ``stage``; -1: no DeepSpeed) with recorders on both sides of its sync callback;
    ``aggregator``: FedArguments' (``"secure"``: rank 0 masks what the party sends)."""
    ctx = create_context((role, pid), PARTIES, "s-ds", address, insecure=True)
    ctx = dataclasses.replace(ctx, connect_attempts=5, reconnect_max_s=2.0)  # a dead arbiter fails the test fast
    tok = gpt2_tokenizer()
    train = TokenizerDataset(tok, max_length=32, padding="max_length").load(csv)
    args = TrainingArguments(
        output_dir=str(Path(out) / ctx.name),
        num_train_epochs=2,
        per_device_train_batch_size=batch_size,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        deepspeed=None if stage < 0 else zero_config(stage, offload_optimizer=offload),
    )
    seed = 0 if role == "guest" else 1  # different starts: the session must bring both to the first joiner's
    client = FedAvgClient(
        ctx=ctx,
        model=tiny_gpt2(seed),
        fed_args=FedArguments("epoch", 1, aggregator),
        training_args=args,
        train_set=train,
        tokenizer=tok,
    )
    log: dict[str, list[torch.Tensor]] = {"before": [], "after": [], "after_model": []}
    handler = client.callback_handler.callbacks
    handler.insert(handler.index(client.fed_sync), Recorder(client, "before", log))
    client.add_callback(Recorder(client, "after", log))
    return client, log


def run(client: FedAvgClient, log: dict[str, list[torch.Tensor]], out: str) -> dict:
    """Train, save the final model (as a user would), and return what the checks need."""
    client.train()
    client.save_model(str(Path(out) / client.ctx.name / "model"))
    optimizer = client.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper > DeepSpeed's ZeRO optimizer > the one that steps
        optimizer = optimizer.optimizer
    return {
        **log,
        "weights": client.fed_sync.weights,
        "access": type(client.fed_sync.access).__name__,
        "optimizer": type(optimizer).__name__,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", required=True)
    p.add_argument("--party-id", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=-1, help="ZeRO stage; -1: no DeepSpeed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--offload", action="store_true", help="the optimizer offloaded to the CPU: DeepSpeedCPUAdam")
    p.add_argument("--aggregator", default="plain", choices=["plain", "secure"])
    a = p.parse_args()
    client, log = build_client(
        a.role, a.party_id, a.csv, a.out, a.address, a.stage, a.batch_size, a.offload, a.aggregator
    )
    result = run(client, log, a.out)
    rank = client.args.process_index
    torch.save(result, Path(a.out) / f"{client.ctx.name}-rank{rank}.pt")
    print(json.dumps({"party": client.ctx.name, "rank": rank, "syncs": client.fed_sync.syncs}), flush=True)


if __name__ == "__main__":
    main()
