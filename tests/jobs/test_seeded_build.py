"""The seeded initial model of a job is the same when an arbiter and its parties are built in threads of one
process (the files-runtime test's arbiter once started from another model than the simulation, 1 run in 8)."""

import threading

from fedfleet.config import load_job
from fedfleet.jobs.assemble import build_parts

JOB = """\
seed: 11
data: {dataset: digits, clients: 3}
model: {name: mlp, hidden: [64, 32]}
"""


def test_parts_built_in_threads_at_once_start_from_the_seeded_model(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    job = load_job(path)
    alone = build_parts(job).trainer.params.clone()
    start = threading.Barrier(6)
    built = []

    def build():
        start.wait()
        built.append(build_parts(job).trainer.params.clone())

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(built) == 6
    assert all(params.allclose(alone, rtol=0, atol=0) for params in built)
