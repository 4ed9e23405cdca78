"""One site's party in a process of its own: ``python -m tests.runtime.files.party_process JOB EXCHANGE NAME ROUNDS``
answers rounds 1..ROUNDS through the exchange folder, one ``run_party_round`` each, as a batch job per round would."""

import sys

from fedfleet.config import load_job
from fedfleet.runtime.files import run_party_round
from tests.runtime.files.file_jobs import PARTIES, POLL, SESSION, site_parts


def main(job_path: str, exchange: str, name: str, rounds: str) -> None:
    trainer, data = site_parts(load_job(job_path, []), name)
    for rnd in range(1, int(rounds) + 1):
        run_party_round(exchange, name, trainer, data, rnd, session=SESSION, timeout=60, poll_s=POLL)
    assert name in PARTIES


if __name__ == "__main__":
    main(*sys.argv[1:])
