"""``runtime.kind: files`` in a job file: ``fedfleet arbiter`` drives the rounds through the folder, the parties
are built from the same file, and the run ends at the simulated model."""

import dataclasses
import threading

import pytest

from fedfleet.callbacks.checkpoint import FILENAME
from fedfleet.cli.main import main
from fedfleet.config import load_job
from fedfleet.core.checkpoint import load_checkpoint
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.runtime.files.exchange import MANIFEST, verify
from tests.runtime.files.file_jobs import JOB, PARTIES

FILES = """\
runtime: {{kind: files, exchange: {exchange}}}
network: {{session: files-job, parties: [guest-9999, host-10000, host-10001], round_timeout: 30}}
"""


def write(tmp_path, rounds=2):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(rounds=rounds, runs=tmp_path / "runs") + FILES.format(exchange=tmp_path / "exchange"))
    return path


def test_fedfleet_arbiter_and_party_with_a_files_runtime_end_at_the_simulated_model(tmp_path):
    path = write(tmp_path)
    job = load_job(path, [])
    errors = []

    def serve(name):  # one `fedfleet party --round N` per round, as a batch job per round would run it
        try:
            for rnd in range(1, job.rounds + 1):
                assert main(["party", str(path), "--name", name, "--round", str(rnd)]) == 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(name,), daemon=True) for name in PARTIES]
    for thread in threads:
        thread.start()
    assert main(["arbiter", str(path), "--quiet"]) == 0
    for thread in threads:
        thread.join(20)
    assert not errors
    # the rounds, and the final params for parties that sync at their own points (FileContext)
    assert sorted(p.name for p in (tmp_path / "exchange").iterdir()) == ["final", "round-0001", "round-0002"]
    sim = Simulation.from_config(dataclasses.replace(job, runtime=dataclasses.replace(job.runtime, kind="simulation",
                                                                                      exchange=None)))  # fmt: skip
    sim.run()
    snap = load_checkpoint(tmp_path / "runs" / job.name / FILENAME, sim.loop.global_params, sim.loop.state)
    assert snap["round"] == 2
    assert snap["global"].allclose(sim.loop.global_params, rtol=0, atol=1e-5)
    final = verify(tmp_path / "exchange" / "final" / MANIFEST, {"kind": "final"}, snap["global"].spec)
    assert final is not None and final.params.allclose(snap["global"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ("{kind: files}", "runtime.kind: files needs runtime.exchange"),
        ("{kind: simulation, exchange: /x}", "runtime.exchange applies to runtime.kind: files only"),
        ("{kind: files, exchange: /x, keep_last: 0}", "runtime.keep_last must be > 0"),
    ],
)
def test_the_files_keys_are_checked(tmp_path, runtime, message):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(rounds=1, runs=tmp_path / "runs") + f"runtime: {runtime}\n")
    with pytest.raises(ConfigError, match=message):
        load_job(path, [])


def test_simulate_refuses_a_files_job_and_says_what_to_run(tmp_path, capsys):
    assert main(["simulate", str(write(tmp_path))]) == 2
    assert "runtime.kind: files is a deployment: run `fedfleet arbiter`" in capsys.readouterr().err


def test_party_round_is_checked(tmp_path, capsys):
    path = write(tmp_path)
    assert main(["party", str(path), "--name", PARTIES[0], "--round", "3"]) == 2
    assert "--round 3 is not a round of this job (1 to 2)" in capsys.readouterr().err
    grpc = tmp_path / "grpc.yaml"
    grpc.write_text(JOB.format(rounds=1, runs=tmp_path / "runs") + "network: {parties: [guest-9999]}\n")
    assert main(["party", str(grpc), "--name", PARTIES[0], "--round", "1"]) == 2
    assert "--round applies to a job with runtime.kind: files" in capsys.readouterr().err
