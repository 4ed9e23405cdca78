"""What each batch system is told in a script's header, one function per scheduler, found in ``SCHEDULERS``.

A directive function takes the site, the job's name and its log file and returns the header lines; the site's
own ``directives`` follow them, each behind the scheduler's prefix (``#SBATCH``, ``#PBS``, ``# flux:``). The
launcher starts the ranks when a job has more than one (``srun`` is the whole launch line: ``hpc/launch.py``
reads the ranks from its variables).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedfleet.hpc.sites.site import Site


@dataclass(frozen=True)
class SchedulerKind:
    prefix: str  # what starts a directive line
    header: Callable[[Site, str, str], list[str]]  # (site, job name, log path) -> the scheduler's options
    launcher: str  # starts the ranks of a multi-rank job
    job_id_in_log: str  # how the log's name takes the job's id (sbatch %j, PBS none: it names the file itself)


def _slurm(site: Site, name: str, log: str) -> list[str]:
    options = [f"--job-name={name}", f"--output={log}", f"--nodes={site.nodes}"]
    options += [f"--ntasks-per-node={site.tasks_per_node}", f"--time={site.time}"]
    options += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(site, key))]
    if site.gpus_per_node:
        options.append(f"--gpus-per-node={site.gpus_per_node}")
    if site.cpus_per_task:
        options.append(f"--cpus-per-task={site.cpus_per_task}")
    return options


def _pbs(site: Site, name: str, log: str) -> list[str]:
    chunk = f"select={site.nodes}:mpiprocs={site.tasks_per_node}"
    if site.cpus_per_task:
        chunk += f":ncpus={site.cpus_per_task * site.tasks_per_node}"
    if site.gpus_per_node:
        chunk += f":ngpus={site.gpus_per_node}"
    hours, rest = divmod(site.seconds, 3600)
    walltime = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    options = [f"-N {name}", f"-o {log}", "-j oe", f"-l {chunk}", f"-l walltime={walltime}"]
    if site.partition:
        options.append(f"-q {site.partition}")
    if site.account:
        options.append(f"-A {site.account}")
    return options


def _flux(site: Site, name: str, log: str) -> list[str]:
    options = [f"--job-name={name}", f"--output={log}", f"-N {site.nodes}", f"-n {site.ranks}", f"-t {site.seconds}s"]
    if site.partition:
        options.append(f"--queue={site.partition}")
    if site.account:
        options.append(f"--bank={site.account}")
    if site.gpus_per_node:
        options.append(f"-g {max(1, site.gpus_per_node // site.tasks_per_node)}")
    if site.cpus_per_task:
        options.append(f"-c {site.cpus_per_task}")
    return options


SCHEDULERS: dict[str, SchedulerKind] = {
    "slurm": SchedulerKind("#SBATCH", _slurm, "srun", "%j"),
    "pbs": SchedulerKind("#PBS", _pbs, "mpiexec", ""),
    "flux": SchedulerKind("# flux:", _flux, "flux run", "{{id}}"),
}


def header_lines(site: Site, name: str, log: str) -> list[str]:
    kind = SCHEDULERS[site.scheduler]
    return [f"{kind.prefix} {option}" for option in (*kind.header(site, name, log), *site.directives)]


def launch_prefix(site: Site) -> str:
    """The site's launcher for a multi-rank job ('' for one rank: the script's own process is the party)."""
    if site.launcher is not None:
        return site.launcher
    return SCHEDULERS[site.scheduler].launcher if site.ranks > 1 else ""
