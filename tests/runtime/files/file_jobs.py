"""A small digits job run over the file runtime: the arbiter's round loop in the test thread, parties in threads."""

from __future__ import annotations

import threading
from pathlib import Path

from fedfleet.config import load_job
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.jobs.assemble import build_parts, fit_config, pipeline_of, selector_of
from fedfleet.runtime.files import Exchange, FileParty, FileRuntime
from fedfleet.strategy import build_strategy

PARTIES = ["guest-9999", "host-10000", "host-10001"]
SESSION = "files-session"
POLL = 0.02

JOB = """\
name: files
seed: 3
rounds: {rounds}
cohort: 3
eval_every: 0
data:
  dataset: digits
  clients: 3
  partition: {{name: dirichlet, alpha: 1.0}}
model: {{name: mlp, hidden: [32]}}
client: {{epochs: 1, batch_size: 16, lr: 0.1}}
output: {{dir: {runs}, progress: false, tensorboard: false}}
"""


def load(tmp_path: Path, rounds: int = 3, extra: str = ""):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(rounds=rounds, runs=tmp_path / "runs") + extra)
    return load_job(path, [])


def arbiter(job, exchange: Path, min_parties: int = 3, round_timeout: float = 30.0, callbacks=(), **kwargs):
    """The round loop of ``job`` driving a FileRuntime on ``exchange`` (the job's seeded initial model)."""
    parts = build_parts(job, clients=len(PARTIES))
    runtime = FileRuntime(
        exchange, session=SESSION, parties=PARTIES, min_parties=min_parties, round_timeout=round_timeout,
        poll_s=POLL, **kwargs,
    )  # fmt: skip
    loop = RoundLoop(
        build_strategy(job.strategy.name, **job.strategy.params),
        runtime,
        selector_of(job),
        parts.trainer.params.clone().to("cpu"),
        fit_config(job),
        LoopConfig(rounds=job.rounds, cohort=job.cohort, seed=job.seed, eval_every=job.eval_every),
        pipeline=pipeline_of(job, len(PARTIES)),
        callbacks=callbacks,
    )
    return loop, runtime


def site_parts(job, name: str):
    """Party ``k``'s trainer and data: shard ``k`` of the job's partition, as client ``k`` of its simulation."""
    parts = build_parts(job, clients=len(PARTIES))
    return parts.trainer, parts.federation.client(PARTIES.index(name))


def party(job, exchange: Path, name: str, timeout: float = 30.0, shard_bytes: int | None = None) -> FileParty:
    trainer, data = site_parts(job, name)
    return FileParty(Exchange(exchange), name, trainer, data, session=SESSION, timeout=timeout, poll_s=POLL,
                     shard_bytes=shard_bytes)  # fmt: skip


def start(target, *args) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:  # the test reads it after join
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread
