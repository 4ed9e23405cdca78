"""The file runtime with the sites' batch jobs: each round, one job per selected site, followed until it ends.

``SiteRuntime`` is a ``FileRuntime``: the same publish, polling, verification and fold. After publishing a
round's global model it writes each selected site's script (``script.py``) beside the run and submits it, unless
the site already has a job queued or running for the round or has published its update (a round run again, a
resumed run); between polls it reads each job's state, says on stderr when one changes, and counts a job that
ended without publishing its update as lost, naming its id, state, exit code and log. When too few sites are left
for ``min_parties`` the run stops (``SiteJobFailed``): a cancelled, failed or timed-out batch job is not resubmitted
on its own, since that spends the site's allocation on what may fail again; the rounds done are checkpointed and
``--resume`` goes on from them. ``cancel_active`` cancels what is still queued or running (Ctrl-C, a failure).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedfleet.errors import UserError
from fedfleet.hpc.sites.jobs import SiteJobs, stderr
from fedfleet.hpc.sites.remote import RemoteSite
from fedfleet.hpc.sites.script import RoundJob
from fedfleet.hpc.sites.site import Site
from fedfleet.hpc.sites.ssh import RemoteError, SshTarget
from fedfleet.hpc.sites.submit import SubmitError, Submitter, submitter_for
from fedfleet.runtime.files.exchange import MANIFEST, Refused, read_manifest
from fedfleet.runtime.files.runtime import FileRuntime

log = logging.getLogger("fedfleet.sites")


class SiteJobFailed(UserError):
    """A site's batch job ended without its update and the round cannot go on without it."""


class SiteRuntime(FileRuntime):
    def __init__(
        self,
        exchange: Any,
        *,
        sites: Sequence[Site],
        job_path: str | Path,
        scripts: str | Path,
        options: Sequence[str] = (),
        workdir: str | Path | None = None,
        resume_hint: str = "",
        submitters: Mapping[str, Submitter] | None = None,
        report: Callable[[str], None] = stderr,
        **file_runtime: Any,
    ) -> None:
        """``sites``: the facilities, by party name (parties without one are started by someone else).
        ``job_path`` and ``options`` (``--set`` ...): what every job's party reads. ``scripts``: where the
        scripts and logs go (``<run>/sites``). ``submitters``: by site name (default: the site's scheduler's)."""
        super().__init__(exchange, **file_runtime)
        unknown = [s.name for s in sites if s.name not in self.index]
        if unknown:
            raise UserError(f"sites {', '.join(unknown)} are not parties of the session ({', '.join(self.parties)})")
        self.sites = {s.name: s for s in sites}
        self.remote = {s.name: RemoteSite(s, SshTarget.of(s), self.exchange) for s in sites if s.reach != "local"}
        chosen = dict(submitters or {})
        for site in sites:
            if site.name not in chosen:
                remote = self.remote.get(site.name)
                chosen[site.name] = submitter_for(site, remote.target if remote else None)
        self.site_jobs = SiteJobs(chosen, report)
        self.job_path = str(Path(job_path).resolve())
        self.options = list(options)
        self.scripts = Path(scripts)
        self.workdir = str(Path(workdir or os.getcwd()).resolve())
        self.resume_hint = resume_hint
        self.jobs = self.site_jobs.jobs  # each site's latest job
        self._update_limit = 0  # the most bytes a site's update may bring over SSH (set as a round is published)

    # -- FileRuntime hooks --------------------------------------------------------------------------
    def publish_global(self, rnd: int, params: Any, tasks: dict[str, dict]) -> str:
        digest = super().publish_global(rnd, params, tasks)
        self._update_limit = 2 * params.nbytes + (1 << 20)  # an update is the model's size (a delta, or whole)
        for name in tasks:
            if name in self.remote:
                self.remote[name].send_job(self.job_path)
                self.remote[name].push_global(rnd)
            if name in self.sites and not self._in_hand(name, rnd, digest):
                self._submit(self.sites[name], rnd)
        return digest

    def fetch(self, rnd: int, pending: set[str]) -> None:
        for name in sorted(pending):
            if name in self.remote:
                self.remote[name].pull_update(rnd, self._update_limit, at_most_every=self.sites[name].poll_s)

    def gone(self, rnd: int, pending: set[str]) -> dict[str, str]:
        lost = {}
        for name in sorted(pending):
            job = self.jobs.get(name)
            if job is None or job.round != rnd or not job.active:
                continue
            try:
                self.site_jobs.follow(job, at_most_every=self.sites[name].poll_s)
            except (SubmitError, RemoteError) as exc:  # the scheduler or the login node did not answer: ask later
                log.warning("site %s: could not read job %s's state: %s", name, job.job_id, exc)
                continue
            if not job.active and name in self.remote:  # it may have published since the last pull
                self.remote[name].pull_update(rnd, self._update_limit)
            if job.active or (self.exchange.update_dir(rnd, name) / MANIFEST).exists():
                continue  # a finished job's manifest is read at the next poll
            lost[name] = f"{job.ended()}; it published no update"
        return lost

    def round_lost(self, rnd: int, gone: dict[str, str]) -> None:
        how = f"; fix the site and continue with: {self.resume_hint} --resume" if self.resume_hint else ""
        saved = {1: "no round is saved yet", 2: "round 1 is saved"}.get(rnd, f"rounds 1-{rnd - 1} are saved")
        raise SiteJobFailed(
            f"round {rnd} cannot reach min_parties={self.min_parties}: {'; '.join(gone.values())}. The run stopped "
            f"({saved}){how}"
        )

    # -- jobs ---------------------------------------------------------------------------------------
    def cancel_active(self) -> list[str]:
        """Cancel every job this runtime submitted that is still queued or running; their ids."""
        return self.site_jobs.cancel_active()

    def _in_hand(self, name: str, rnd: int, digest: str) -> bool:
        """The site has this round's update already, or a job still working on it."""
        try:
            done = read_manifest(self.exchange.update_dir(rnd, name) / MANIFEST)
        except Refused:
            done = None
        if done is not None and done.get("global_manifest_sha256") == digest:
            return True
        job = self.jobs.get(name)
        if job is not None and job.round == rnd and job.active:
            self.site_jobs.follow(job)
            return job.active
        return False

    def _submit(self, site: Site, rnd: int) -> None:
        scripts = (self.scripts / site.name).resolve()
        remote = self.remote.get(site.name)
        if remote is None:
            job, logs, workdir = RoundJob(self.job_path, rnd, self.options), scripts, site.workdir or self.workdir
        else:  # the site's own copies: its job file, exchange and log folder
            job = RoundJob(remote.job_path, rnd, [*self.options, *remote.options()])
            logs, workdir = remote.logs, site.workdir or remote.root
        where = f" on {remote.target.host}" if remote else ""
        self.site_jobs.submit(site, job, scripts=scripts, logs=logs, workdir=workdir, where=where)

    def close(self) -> None:
        """End the kept SSH connections."""
        for remote in self.remote.values():
            remote.target.close()
