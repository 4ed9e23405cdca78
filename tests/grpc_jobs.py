"""Small deployed jobs for the gRPC tests: an arbiter and parties on loopback, in threads or processes."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from fedfleet.config import load_job
from fedfleet.jobs.deploy import Access, build_arbiter, build_party
from fedfleet.security import init_ca, issue

PARTIES = ["guest-9999", "host-10000", "host-10001"]

JOB = """\
name: net
seed: 3
rounds: 3
cohort: 3
eval_every: 0
data:
  dataset: digits
  clients: 3
  partition: {{name: dirichlet, alpha: 1.0}}
model: {{name: mlp, hidden: [32]}}
client: {{epochs: 1, batch_size: 16, lr: 0.1}}
network:
  address: 127.0.0.1:{port}
  session: test-session
  parties: [guest-9999, host-10000, host-10001]
  certs: {certs}
  round_timeout: 60
  join_timeout: 20
  wait_timeout: 60
  heartbeat_s: 0.5
  reconnect_max_s: 1.0
output: {{dir: {runs}, progress: false, tensorboard: false}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_job(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(port=free_port(), certs=tmp_path / "certs", runs=tmp_path / "runs") + extra)
    return path


def make_certs(folder: Path, names: list[str]) -> None:
    init_ca(folder)
    for name in ["arbiter", *names]:
        issue(folder, name)


class ThreadedFederation:
    """The arbiter's loop in the test thread, each party's ``run()`` in a thread of its own."""

    def __init__(
        self, job_path: Path, overrides: list[str] = (), insecure: bool = True, party_class=None, skip=()
    ) -> None:
        self.job = load_job(job_path, list(overrides))
        self.access = Access(insecure, self.job.network.certs, self.job.network.address)
        self.arbiter = build_arbiter(self.job, self.access)
        self.parties = {}
        for name in self.job.network.parties:
            if name in skip:  # played by the test itself (a rogue speaking the protocol by hand)
                continue
            party = build_party(self.job, name, self.access)
            if party_class is not None and name in party_class:
                party.__class__ = party_class[name]
            self.parties[name] = party
        self.threads: list[threading.Thread] = []

    def run(self, before_parties=None):
        """The whole session; ``before_parties()`` runs once the arbiter listens, before any party starts."""
        self.arbiter.server.start()
        if before_parties is not None:
            before_parties()
        for party in self.parties.values():
            thread = threading.Thread(target=party.run, daemon=True)
            thread.start()
            self.threads.append(thread)
        try:
            history = self.arbiter.prepare().run()
            self.arbiter.runtime.finish()
            for thread in self.threads:
                thread.join(10)
            return history
        finally:
            self.arbiter.server.stop(grace=0.5)
