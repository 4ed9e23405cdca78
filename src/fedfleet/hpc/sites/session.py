"""A gRPC session's sites: one batch job per site for the whole run, its party dialling the arbiter.

Where compute nodes may open outbound connections, each site's job runs ``fedfleet party JOB --name SITE`` once:
it dials ``network.address`` (mutual TLS from ``network.certs``, or ``--insecure``), trains whenever the arbiter
asks, and ends when the session does. ``SessionJobs`` submits those jobs before the arbiter starts (a party
redials until the arbiter listens), follows them in a thread, says when one changes state and when one ends
while the session still runs (the arbiter then handles the party as gone: ``min_parties``, its round and join
timeouts), and cancels what is still queued or running when the session ends, fails or is interrupted. A site
reached over SSH gets the job file and its own party's certificate, key and the CA certificate copied into its
``remote_dir`` first (nothing else: not the other parties' keys, not the CA's key).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedfleet.errors import ConfigError
from fedfleet.hpc.sites.jobs import SiteJobs, stderr
from fedfleet.hpc.sites.script import RoundJob
from fedfleet.hpc.sites.site import Site
from fedfleet.hpc.sites.ssh import RemoteError, SshTarget
from fedfleet.hpc.sites.submit import SubmitError, submitter_for


class SessionJobs:
    def __init__(
        self,
        sites: Sequence[Site],
        *,
        job_path: str | Path,
        scripts: str | Path,
        options: Sequence[str] = (),
        workdir: str | Path | None = None,
        certs: str | Path | None = None,
        report: Callable[[str], None] = stderr,
    ) -> None:
        """``certs``: the session's certificate folder (None: plaintext); a site reached over SSH gets its own
        party's certificate, key and the CA's certificate copied into ``remote_dir/certs``."""
        self.sites = list(sites)
        self.targets = {s.name: SshTarget.of(s) for s in sites if s.reach != "local"}
        self.jobs = SiteJobs({s.name: submitter_for(s, self.targets.get(s.name)) for s in sites}, report)
        self.certs = Path(certs) if certs is not None else None
        self.job_path = str(Path(job_path).resolve())
        self.options = list(options)
        self.scripts = Path(scripts)
        self.workdir = str(Path(workdir or os.getcwd()).resolve())
        self.report = report
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Submit every site's job and follow them until ``stop``."""
        for site in self.sites:
            folder = (self.scripts / site.name).resolve()
            target = self.targets.get(site.name)
            if target is None:
                job = RoundJob(self.job_path, None, self.options)
                self.jobs.submit(site, job, scripts=folder, logs=folder, workdir=site.workdir or self.workdir)
                continue
            job, logs = self._send_to(site, target)
            self.jobs.submit(site, job, scripts=folder, logs=logs, workdir=site.workdir or site.remote_dir or "",
                             where=f" on {target.host}")  # fmt: skip
        self._watcher = threading.Thread(target=self._watch, name="fedfleet-sites", daemon=True)
        self._watcher.start()

    def stop(self, grace_s: float = 0.0) -> list[str]:
        """Stop following; give the jobs ``grace_s`` to end by themselves (after a finished session their parties
        are told it is done and exit), then cancel what is still queued or running; the cancelled job ids."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(job.active for job in self.jobs.jobs.values()):
            time.sleep(0.5)
            for job in self.jobs.jobs.values():
                try:
                    self.jobs.follow(job)
                except (SubmitError, RemoteError):
                    continue
        cancelled = self.jobs.cancel_active()
        for target in self.targets.values():
            target.close()
        return cancelled

    def _send_to(self, site: Site, target: SshTarget) -> tuple[RoundJob, Path]:
        """Copy the job file (and the party's certificates) to the site; the job its party runs there, and
        where its log goes."""
        root = Path(site.remote_dir or "")
        logs, certs = root / "sites" / site.name, root / "certs"
        target.run(["mkdir", "-p", str(logs), str(certs)])
        target.push_file(Path(self.job_path), str(root / "job.yaml"))
        options = list(self.options)
        if self.certs is not None:
            for name in ("ca.crt", f"{site.name}.crt", f"{site.name}.key"):
                if not (self.certs / name).is_file():
                    raise ConfigError(f"site {site.name}: {self.certs / name} is missing (fedfleet certs issue ...)")
                target.push_file(self.certs / name, str(certs / name))
            target.run(["chmod", "600", str(certs / f"{site.name}.key")])
            options += ["--certs", str(certs)]
        return RoundJob(str(root / "job.yaml"), None, options), logs

    def _watch(self) -> None:
        polls = {s.name: s.poll_s for s in self.sites}
        while not self._stop.wait(min(polls.values())):
            for job in list(self.jobs.jobs.values()):
                if not job.active:
                    continue
                try:
                    self.jobs.follow(job, at_most_every=polls[job.site])
                except (SubmitError, RemoteError) as exc:  # the scheduler did not answer this time: ask again later
                    self.report(f"site {job.site}: could not read job {job.job_id}'s state: {exc}")
                    continue
                if not job.active and not self._stop.is_set():
                    self.report(f"site {job.site}: {job.ended()}; the arbiter goes on without that party")
