"""The batch jobs fedfleet submitted for the sites: submit, follow (state changes on stderr), cancel.

Shared by the file runtime's job per site per round (``runtime.py``) and a gRPC session's one job per site for the
whole run (``session.py``). A job's state is asked for at most every ``poll_s`` of its site; ``cancel_active``
cancels whatever is still queued or running, and says so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedfleet.hpc.sites.script import RoundJob, default_python, log_name, log_path, render
from fedfleet.hpc.sites.site import Site
from fedfleet.hpc.sites.ssh import RemoteError
from fedfleet.hpc.sites.submit import SubmitError, Submitter


@dataclass
class SiteJob:
    site: str
    round: int | None  # None: the job serves the whole session
    job_id: str
    log: Path
    submitted: float = field(default_factory=time.monotonic)
    state: str = "SUBMITTED"
    exit_code: int | None = None
    asked: float = 0.0  # when the scheduler was last asked (time.monotonic)

    @property
    def active(self) -> bool:
        return self.exit_code is None

    @property
    def label(self) -> str:
        where = f"site {self.site}"
        return where if self.round is None else f"round {self.round}: {where}"

    def ended(self) -> str:
        what = f"job {self.job_id} on site {self.site} ended {self.state} (exit code {self.exit_code})"
        return f"{what}; its log: {self.log}"


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SiteJobs:
    def __init__(self, submitters: Mapping[str, Submitter], report: Callable[[str], None] = stderr) -> None:
        self.submitters = dict(submitters)
        self.report = report
        self.jobs: dict[str, SiteJob] = {}  # each site's latest job

    def submit(self, site: Site, job: RoundJob, *, scripts: Path, logs: Path, workdir: str, where: str = "") -> SiteJob:
        """Write ``site``'s script for ``job`` into ``scripts`` (its log in ``logs``) and submit it."""
        scripts.mkdir(parents=True, exist_ok=True)
        log = logs / log_name(site, job.round)
        text = render(site, job, log=str(log), workdir=workdir, python=default_python(site))
        script = scripts / (f"round-{job.round:04d}.sh" if job.round is not None else "session.sh")
        script.write_text(text)
        job_id = self.submitters[site.name].submit(script)
        found = SiteJob(site.name, job.round, job_id, log_path(site, logs, job.round, job_id))
        self.jobs[site.name] = found
        self.report(f"{found.label}: submitted job {job_id}{where} ({script})")
        return found

    def follow(self, job: SiteJob, at_most_every: float = 0.0) -> None:
        """Ask the scheduler for ``job``'s state (unless asked less than ``at_most_every`` s ago); say changes."""
        if not job.active or time.monotonic() - job.asked < at_most_every:
            return
        job.asked = time.monotonic()
        now = self.submitters[job.site].state(job.job_id)
        if now.state != job.state:
            took = time.monotonic() - job.submitted
            self.report(f"{job.label}: job {job.job_id} {now.state} ({took:.1f} s after submit)")
        job.state = now.state
        job.exit_code = None if now.active else now.exit_code if now.exit_code is not None else -1

    def cancel_active(self) -> list[str]:
        """Cancel every job submitted here that is still queued or running; their ids."""
        cancelled = []
        for job in self.jobs.values():
            if not job.active:
                continue
            try:
                self.follow(job)
                if job.active:
                    self.submitters[job.site].cancel(job.job_id)
                    cancelled.append(job.job_id)
                    self.report(f"site {job.site}: cancelled job {job.job_id}" + (
                        f" (round {job.round})" if job.round is not None else ""))  # fmt: skip
            except (SubmitError, RemoteError) as exc:
                self.report(f"site {job.site}: could not cancel job {job.job_id}: {exc}")
        return cancelled
