"""The deployed federation as real processes with mutual TLS: parties and the arbiter killed with SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file

from fedfleet.config import load_job
from fedfleet.jobs.simulation import Simulation
from tests.grpc_jobs import PARTIES, make_certs, write_job

SLOW_ROUNDS = ["--set", "client.epochs=8"]  # rounds that take a while (0.1-1 s), so a kill can land mid-round


def start(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "fedfleet.cli.main", *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # four processes share two cores
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(tmp_path):
    path = tmp_path / "runs" / "net" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_rows(tmp_path, n, proc, timeout=120):
    deadline = time.time() + timeout
    while len(rows(tmp_path)) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the arbiter made no progress"
        time.sleep(0.05)


def wait_for_line(proc, text, timeout=120):
    """Read ``proc``'s stderr until a line holds ``text`` (the rest is drained in the background)."""
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            if text in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(timeout), f"{proc.args[3:]} never printed {text!r}"


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args[3:]} exited with {proc.returncode}:\n{err}"
    return out, err


def test_a_killed_party_is_dropped_for_the_round_and_rejoins(tmp_path):
    make_certs(tmp_path / "certs", PARTIES)
    job = str(write_job(tmp_path))
    common = [*SLOW_ROUNDS, "--set", "rounds=5", "--set", "network.min_parties=2"]
    arbiter = start("arbiter", job, *common, "--quiet", cwd=tmp_path)
    parties = {name: start("party", job, *common, "--name", name, cwd=tmp_path) for name in PARTIES}
    wait_for_line(parties["host-10001"], "round 2: training")  # mid-round: it holds round 2's task
    parties["host-10001"].send_signal(signal.SIGKILL)
    parties["host-10001"].wait()
    parties["host-10001"] = start("party", job, *common, "--name", "host-10001", cwd=tmp_path)
    out, _ = finish(arbiter)
    for proc in parties.values():
        finish(proc, 60)
    clients = [r["clients"] for r in rows(tmp_path)]
    assert len(clients) == 5 and 2.0 in clients  # the round it was killed in went on without it
    assert clients[-1] == 3.0  # and it took part again after its restart
    assert "final" in out or "done" in out


def test_a_killed_arbiter_resumes_and_ends_at_the_uninterrupted_model(tmp_path):
    make_certs(tmp_path / "certs", PARTIES)
    job = str(write_job(tmp_path))
    common = [*SLOW_ROUNDS, "--set", "rounds=4"]
    arbiter = start("arbiter", job, *common, "--quiet", cwd=tmp_path)
    parties = [start("party", job, *common, "--name", name, cwd=tmp_path) for name in PARTIES]
    wait_for_line(parties[0], "round 3: training")  # the arbiter is in round 3: two rounds done, two to go
    arbiter.send_signal(signal.SIGKILL)
    arbiter.communicate()
    status = json.loads((tmp_path / "runs" / "net" / "status.json").read_text())
    assert status["state"] == "running"  # a crash leaves no "finished" behind

    resumed = start("arbiter", job, *common, "--quiet", "--resume", cwd=tmp_path)
    _, err = finish(resumed)
    assert re.search(r"resuming .* after round [23]\b", err), err
    assert parties[0].wait(60) == 0  # its stderr is read by wait_for_line's thread
    for proc in parties[1:]:
        finish(proc, 60)
    status = json.loads((tmp_path / "runs" / "net" / "status.json").read_text())
    assert status["state"] == "finished" and status["round"] == 4
    assert [row["round"] for row in rows(tmp_path)] == [1, 2, 3, 4]  # the interrupted round once, not twice

    sim = Simulation.from_config(load_job(job, [c for c in common if c != "--set"]))
    sim.run()
    deployed = load_file(str(tmp_path / "runs" / "net" / "model.safetensors"))
    assert_near_the_simulation(deployed, sim.loop.global_params.tensors())


def assert_near_the_simulation(deployed: dict, simulated: dict) -> None:
    """The arbiter folds updates in their arrival order, in float32, and its parties train with another thread
    count than the simulation: the models differ in the last bits, and eight epochs a round sometimes grow that
    (measured over 21 deployed runs and 20 shuffled fold orders: 3.6e-7 at most in 4 of 5, 1.0e-3 at most and
    3.5e-4 relative in the rest: CI failed on atol 1e-5). A resume that repeats, skips or mixes up a round is
    100 times further off: one round more or less moves the model by 0.06-0.08 relative, 0.07-0.09 at most."""
    for name, tensor in simulated.items():
        torch.testing.assert_close(deployed[name], tensor, rtol=0, atol=1e-2)
    flat = torch.cat([t.flatten() for t in simulated.values()])
    gap = torch.cat([(deployed[name] - t).flatten() for name, t in simulated.items()])
    assert float(gap.norm() / flat.norm()) < 2e-3


def test_local_starts_an_arbiter_and_its_parties_with_fresh_certificates(tmp_path):
    job = str(write_job(tmp_path))
    local = start("local", job, "--set", "rounds=2", cwd=tmp_path)
    out, err = finish(local, 180)
    assert "created a certificate authority" in err
    assert (tmp_path / "certs" / "guest-9999.crt").is_file()
    assert "arbiter |" in out and "host-10001 |" in out and "done: 2 rounds" in out


def test_an_arbiter_that_gives_up_tells_the_parties_why_and_they_stop(tmp_path):
    """Two of three parties come; the arbiter gives up after its wait, and the two stop instead of redialling."""
    make_certs(tmp_path / "certs", PARTIES)
    job = str(write_job(tmp_path))
    common = ["--set", "network.wait_timeout=4", "--set", "network.join_timeout=1"]
    arbiter = start("arbiter", job, *common, "--quiet", cwd=tmp_path)
    parties = [start("party", job, *common, "--name", name, cwd=tmp_path) for name in PARTIES[:2]]
    _, err = arbiter.communicate(timeout=120)
    assert arbiter.returncode == 2 and "missing host-10001" in err
    for proc in parties:
        _, party_err = proc.communicate(timeout=30)  # it would redial for good, were it not told
        assert proc.returncode == 2, party_err
        assert "the arbiter ended session" in party_err and "missing host-10001" in party_err
