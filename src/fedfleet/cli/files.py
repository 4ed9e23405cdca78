"""``fedfleet arbiter`` and ``fedfleet party`` for a job with ``runtime.kind: files`` (no network between them)."""

from __future__ import annotations

import sys

from fedfleet.cli.run_job import run_loop_in_folder
from fedfleet.config.schema import JobConfig
from fedfleet.errors import ConfigError
from fedfleet.jobs.files import build_file_arbiter, build_file_party


def files_arbiter(job: JobConfig, job_path: str, *, resume: bool, overwrite: bool, quiet: bool) -> int:
    arbiter = build_file_arbiter(job)
    print(
        f"arbiter of session {job.network.session!r} exchanging rounds through {job.runtime.exchange}; parties: "
        f"{', '.join(job.network.parties)}",
        file=sys.stderr,
        flush=True,
    )
    code = run_loop_in_folder(
        arbiter.loop,
        job,
        resume_command=f"fedfleet arbiter {job_path}",
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        checkpoint_every=1,  # a round on a batch site is costly: a crash loses at most one
    )
    if code == 0:  # parties that sync at their own points (FileContext) end on the final params
        arbiter.runtime.publish_final(arbiter.loop.global_params)
    return code


def files_party(job: JobConfig, name: str, rnd: int | None = None) -> int:
    """Every round from the earliest the folder holds to the job's last, or only round ``rnd``."""
    if rnd is not None and not 1 <= rnd <= job.rounds:
        raise ConfigError(f"--round {rnd} is not a round of this job (1 to {job.rounds})")
    party = build_file_party(job, name)
    print(f"{name}: answering rounds through {job.runtime.exchange}", file=sys.stderr, flush=True)
    try:
        answered = party.run(job.rounds) if rnd is None else [party.run_round(rnd)]
    except KeyboardInterrupt:
        print(f"\n{name}: stopped", file=sys.stderr)
        return 130
    print(f"{name}: answered {sum(p is not None for p in answered)} round(s)", file=sys.stderr)
    return 0
