"""``fedfleet simulate``: job file -> typed config -> checks -> run folder -> rounds -> final line."""

from __future__ import annotations

import sys

import yaml

from fedfleet.cli.run_job import run_loop_in_folder
from fedfleet.config import load_job, to_dict
from fedfleet.simulation import Simulation


def simulate_command(
    job_path: str,
    overrides: list[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
) -> int:
    job = load_job(job_path, overrides)
    sim = Simulation.from_config(job)  # every check that can fail runs here, before the run folder exists
    if dry_run:
        print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
        print(f"# ok: {sim.federation.num_clients} clients, {sim.trainer.params.numel:,} params", file=sys.stderr)
        return 0
    return run_loop_in_folder(
        sim.loop,
        job,
        resume_command=f"fedfleet simulate {job_path}",
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )
