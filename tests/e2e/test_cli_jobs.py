"""Simulation features run through the fedfleet command as a user does: FedBuff and system traces."""

import json
import subprocess
import sys

from tests.paths import ROOT


def test_cli_runs_the_example_and_writes_one_row_per_server_step(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "fedfleet.cli.main", "simulate", str(ROOT / "examples" / "digits_fedbuff.yaml"),
            "--set", "rounds=4", "--set", "eval_every=2", "--set", "data.clients=30", "--set", "fedbuff.concurrency=6",
            "--set", "fedbuff.buffer=3", "--set", "runtime.vectorize=off", "--set", "output.tensorboard=false",
            "--quiet",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("simulated time: ") and lines[-1].endswith(")") and "after 4 server steps" in lines[-1]
    run = tmp_path / "runs" / "digits-fedbuff"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert {"staleness_mean", "staleness_max", "dropped_offline", "sim_time_s", "wall_time_s"} <= rows[0].keys()
    assert "test_accuracy" in rows[1] and (run / "checkpoint.safetensors").is_file()


def test_cli_reports_simulated_time_next_to_wall_time(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "fedfleet.cli.main", "simulate", str(ROOT / "examples" / "digits_oort_system.yaml"),
            "--set", "rounds=1", "--set", "data.clients=30", "--set", "cohort=3",
            "--set", "runtime.vectorize=off", "--set", "output.tensorboard=false", "--quiet",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("simulated time: ") and "(wall " in lines[-2] and "test_accuracy 0.8" in lines[-2]
    assert lines[-1].startswith("final test accuracy: ")
