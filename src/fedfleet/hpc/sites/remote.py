"""A site reached over SSH, as the sites' runtime sees it: where its copies live and how they move.

The job file goes once to ``remote_dir/job.yaml``; the site's jobs read it with ``runtime.exchange`` set to the
site's copy of the exchange (``remote_dir/exchange``); each round's global model is pushed there after it is
published here, and the site's update is pulled back into this machine's exchange, where the runtime verifies it
as any other. Logs stay on the site (``remote_dir/sites/<site>/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedfleet.hpc.sites.site import Site
from fedfleet.hpc.sites.ssh import RemoteError, SshTarget
from fedfleet.runtime.files.exchange import Exchange

log = logging.getLogger("fedfleet.sites")
STAGING = ".incoming"  # beside the rounds in this machine's exchange: the round listing ignores it


class RemoteSite:
    def __init__(self, site: Site, target: SshTarget, exchange: Exchange) -> None:
        self.site = site
        self.target = target
        self.exchange = exchange
        self.root = site.remote_dir or ""
        self.remote_exchange = Exchange(f"{self.root}/exchange")
        self.job_path = f"{self.root}/job.yaml"
        self.logs = Path(self.root) / "sites" / site.name
        self._job_sent = False
        self._pulled_at = 0.0

    def options(self) -> list[str]:
        """What the site's party is told on top of the job file: where its copy of the exchange is."""
        return ["--set", f"runtime.exchange={self.remote_exchange.root}"]

    def send_job(self, job_path: str) -> None:
        if not self._job_sent:
            self.target.run(["mkdir", "-p", str(self.logs), str(self.remote_exchange.root)])
            self.target.push_file(Path(job_path), self.job_path)
            self._job_sent = True

    def push_global(self, rnd: int) -> None:
        self.target.push(self.exchange.global_dir(rnd), str(self.remote_exchange.global_dir(rnd)))

    def pull_update(self, rnd: int, max_bytes: int, *, at_most_every: float = 0.0) -> bool:
        """Bring the site's update of round ``rnd`` here if it has published one (its files at most ``max_bytes``
        in all); whether it did."""
        if time.monotonic() - self._pulled_at < at_most_every:
            return False
        self._pulled_at = time.monotonic()
        name = self.site.name
        try:
            return self._pull(rnd, name, max_bytes)
        except RemoteError as exc:  # the login node did not answer this time: the next poll asks again
            log.warning("site %s: could not look for its round-%d update: %s", name, rnd, exc)
            return False

    def _pull(self, rnd: int, name: str, max_bytes: int) -> bool:
        return self.target.pull_published(
            str(self.remote_exchange.update_dir(rnd, name)),
            self.exchange.root / STAGING / name / f"round-{rnd:04d}",
            self.exchange.update_dir(rnd, name),
            max_bytes,
        )
