"""``fedfleet simulate``: job file (or FedScale conf.yml) -> typed config -> checks -> run folder -> rounds."""

from __future__ import annotations

import sys

import yaml

from fedfleet.cli.run_job import run_loop_in_folder
from fedfleet.config import JobConfig, load_job, to_dict
from fedfleet.config.fedscale import from_fedscale
from fedfleet.config.fedscale_read import is_fedscale_file
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation


def simulate_command(
    job_path: str | None,
    overrides: list[str],
    *,
    fedscale: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    print_config: bool = False,
    quiet: bool = False,
) -> int:
    job, printed, source = _load(job_path, fedscale, overrides)
    if print_config:  # the job file alone: no data is read, nothing is built
        print(printed, end="")
        return 0
    if job.runtime.kind == "files":
        raise ConfigError(
            "runtime.kind: files is a deployment: run `fedfleet arbiter` and each site's `fedfleet party` "
            "(docs/file-exchange.md); to simulate the job, remove runtime.kind and runtime.exchange"
        )
    sim = Simulation.from_config(job)  # every check that can fail runs here, before the run folder exists
    if dry_run:
        print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
        print(f"# ok: {sim.federation.num_clients} clients, {sim.trainer.params.numel:,} params", file=sys.stderr)
        return 0
    return run_loop_in_folder(
        sim.loop,
        job,
        resume_command=f"fedfleet simulate {source}",
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )


def _load(job_path: str | None, fedscale: str | None, overrides: list[str]) -> tuple[JobConfig, str, str]:
    """The job, its text as a fedfleet job file, and how to name it again in a resume command."""
    if job_path is not None and fedscale is not None:
        raise ConfigError(f"give a job file or --from-fedscale, not both (got {job_path} and {fedscale})")
    if job_path is not None and is_fedscale_file(job_path):  # a FedScale user's own conf.yml, as they run it
        print(f"fedfleet: {job_path} is a FedScale job file (job_conf: list): translating it", file=sys.stderr)
        job_path, fedscale = None, job_path
    if fedscale is not None:
        report = from_fedscale(fedscale, overrides, warn=False)
        message = report.warning()
        if message is not None:
            print(f"fedfleet: warning: {message}", file=sys.stderr)
        return report.job, report.to_yaml(), f"--from-fedscale {fedscale}"
    if job_path is None:
        raise ConfigError(
            "no job: give a job file (fedfleet simulate examples/digits_fedavg.yaml) or a FedScale one "
            "(fedfleet simulate --from-fedscale conf.yml)"
        )
    job = load_job(job_path, overrides)
    return job, yaml.safe_dump(to_dict(job), sort_keys=False), job_path
