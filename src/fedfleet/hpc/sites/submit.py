"""Submitting a site's script, reading its job's state and cancelling it, through the batch system's commands.

SLURM is first-class: ``sbatch --parsable`` submits; the state comes from ``squeue`` while the job is queued or
running and from ``scontrol show job`` once it ended (never only ``sacct``: many sites turn accounting off, and
then it knows nothing); ``scancel`` cancels. The commands run with this machine's environment less the SLURM_*
variables of an enclosing job (``fedfleet sites run`` inside an allocation would otherwise submit into it), plus
the site's ``scheduler_env``; for a site reached over SSH they run on its login node (``ssh.py``), the script
handed to sbatch on its stdin. PBS and Flux scripts are written by the same template mechanism, but are not
submitted by fedfleet yet: ``fedfleet sites render`` writes them for the site's own ``qsub`` / ``flux batch``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fedfleet.errors import ConfigError, UserError
from fedfleet.hpc.sites.site import Site

if TYPE_CHECKING:
    from fedfleet.hpc.sites.ssh import SshTarget

ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                    "STAGE_OUT", "SIGNALING", "REQUEUE_HOLD", "REQUEUE_FED"})  # fmt: skip
INHERITED = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
COMMAND_TIMEOUT_S = 60.0


class SubmitError(UserError):
    """A batch command failed (the scheduler refused the script, or is not reachable)."""


@dataclass(frozen=True)
class JobState:
    state: str  # the scheduler's word: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int | None = None  # the script's status, or 128 + the signal that ended it; None while active

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class Submitter(Protocol):
    def submit(self, script: Path) -> str: ...
    def state(self, job_id: str) -> JobState: ...
    def cancel(self, job_id: str) -> None: ...


def scheduler_environment(site: Site, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(INHERITED)}
    env.update({k: str(v) for k, v in site.scheduler_env.items()})
    return env


class Runner(Protocol):
    """Runs a scheduler command where the site's scheduler is (here, or on its login node); its stdout."""

    def __call__(self, argv: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str: ...


class LocalRunner:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.env = scheduler_environment(site)

    def __call__(self, argv: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str:
        try:
            done = subprocess.run(list(argv), env=self.env, input=stdin, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)  # fmt: skip
        except FileNotFoundError:
            raise SubmitError(f"site {self.site.name}: {argv[0]} not found: is SLURM's client installed?") from None
        except subprocess.TimeoutExpired:
            raise SubmitError(f"site {self.site.name}: {argv[0]} did not answer in {COMMAND_TIMEOUT_S:g} s") from None
        if check and done.returncode != 0:
            why = (done.stderr or done.stdout).strip()[-2000:]
            raise SubmitError(f"site {self.site.name}: {' '.join(argv[:2])} failed ({done.returncode}): {why}")
        return done.stdout


class SlurmSubmitter:
    """``sbatch``/``squeue``/``scontrol``/``scancel`` through ``runner``; the script is handed to sbatch on its
    stdin (``script_on_stdin``: the site does not see this machine's files) or by its path."""

    def __init__(self, site: Site, runner: Runner | None = None, script_on_stdin: bool = False) -> None:
        self.site = site
        self.run = runner or LocalRunner(site)
        self.script_on_stdin = script_on_stdin

    def submit(self, script: Path) -> str:
        if self.script_on_stdin:
            out = self.run(["sbatch", "--parsable"], stdin=script.read_text()).strip()
        else:
            out = self.run(["sbatch", "--parsable", str(script)]).strip()
        job_id = out.split(";")[0]  # "id" or "id;cluster"
        if not job_id.isdigit():
            raise SubmitError(f"site {self.site.name}: sbatch printed {out!r}, not a job id")
        return job_id

    def state(self, job_id: str) -> JobState:
        queued = self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).strip()
        if queued in ACTIVE:
            return JobState(queued)
        fields = self._show(job_id)
        state = fields.get("JobState", queued or "UNKNOWN")
        if state in ACTIVE:
            return JobState(state)
        code, _, signal = fields.get("ExitCode", "0:0").partition(":")
        status, sig = int(code or 0) if code.isdigit() else 0, int(signal) if signal.isdigit() else 0
        return JobState(state, status if status or not sig else 128 + sig)

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", job_id], check=False)

    def _show(self, job_id: str) -> dict[str, str]:
        fields: dict[str, str] = {}
        for word in self.run(["scontrol", "show", "job", "-o", job_id], check=False).split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:  # the first JobState=, not a later echo of it in Reason=
                fields[key] = value
        return fields


SUBMITTERS = {"slurm": SlurmSubmitter}  # pbs, flux: scripts only (``fedfleet sites render``)


def submitter_for(site: Site, target: SshTarget | None = None) -> Submitter:
    """The submitter of ``site``'s scheduler: its commands here, or over ``target`` for a site reached by SSH."""
    make = SUBMITTERS.get(site.scheduler)
    if make is None:
        raise ConfigError(
            f"sites[{site.name}].scheduler {site.scheduler}: fedfleet writes its scripts (fedfleet sites render) "
            f"but submits only to slurm so far; submit them with the site's own command"
        )
    if target is None:
        return make(site)
    env = {k: str(v) for k, v in site.scheduler_env.items()}

    def remote(argv: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str:
        return target.run(argv, stdin=stdin, check=check, env=env, cwd=site.remote_dir)

    return make(site, remote, script_on_stdin=True)
