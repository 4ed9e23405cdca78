"""One rank of a two-rank Hugging Face party (tests/e2e/test_hf_rank_failure.py): started as a launcher such as
srun or mpirun would, with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* in the environment and no torchrun
agent to kill the other ranks when one fails. Prints ``rank R synced N`` after each sync and, on failure,
``rank R failed: <error>`` before exiting with code 3."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from fedfleet.hf import FedArguments, create_context
from fedfleet.sync import end_process_group
from tests.hf_parties import make_client, review_shares


class Report(TrainerCallback):
    def __init__(self, client, rank):
        self.client, self.rank, self.seen = client, rank, 0

    def on_step_end(self, args, state, control, **kw):
        if self.client.fed_sync.syncs > self.seen:
            self.seen = self.client.fed_sync.syncs
            print(f"rank {self.rank} synced {self.seen}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--work", type=Path, required=True)
    opts = p.parse_args()
    rank = int(os.environ["RANK"])
    parties = [("guest", "1"), ("arbiter", "2")]
    ctx = create_context(parties[0], parties, "s-ranks", opts.address, insecure=True)
    ctx = dataclasses.replace(ctx, connect_attempts=2, reconnect_max_s=0.3, heartbeat_s=0.5)
    csv = review_shares(opts.work / f"data{rank}", 1, reviews=160)[0]
    client, *_ = make_client(ctx, csv, 0, FedArguments("step", 1), opts.work / f"out{rank}", epochs=20)
    client.add_callback(Report(client, rank))
    try:
        client.train()
    except BaseException as exc:
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", flush=True)
        # a rank that lives on after its error (writing logs, a notebook's kernel) until the test lets it go:
        # the other ranks must not learn of the failure only from its process ending
        release = opts.work / "release"
        for _ in range(600 if rank == 0 else 0):
            if release.exists():
                break
            time.sleep(0.1)
        return 3
    finally:
        # as torch asks of every script: a gloo group left to the interpreter's exit can abort the process
        # there (seen once in ~20 runs: rank 1 raised RankFailed, then died of SIGABRT, "terminate called
        # without an active exception") instead of exiting with its own code
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    end_process_group()  # the model's and the Trainer's cycles freed while the interpreter is whole
    sys.exit(code)
