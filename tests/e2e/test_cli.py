"""The command line as a user meets it: real subprocesses, real files, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_runner import fedfleet
from tests.paths import ROOT

SMALL = ["--set", "rounds=3", "--set", "data.clients=20", "--set", "cohort=4", "--set", "eval_every=1"]


def job(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: t\noutput: {{dir: {tmp_path / 'runs'}, tensorboard: false}}\n{text}")
    return path


def test_help_explains_every_command(tmp_path):
    out = fedfleet("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "simulate" in out.stdout and "list" in out.stdout and "examples:" in out.stdout
    sim = fedfleet("simulate", "--help", cwd=tmp_path)
    for option in ("--set", "--resume", "--overwrite", "--dry-run", "--quiet"):
        assert option in sim.stdout
    listing = fedfleet("list", cwd=tmp_path)
    assert "fedavg" in listing.stdout and "simple_cnn" in listing.stdout and "dirichlet" in listing.stdout


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("client: {lrr: 0.1}\n", [], "client.lrr: unknown key (did you mean 'lr'?)"),
        ("client: {lr: -0.1}\n", [], "client.lr must be > 0"),
        ("", ["--set", "cohort=500"], "cohort 500 is larger than the 100 clients"),
        ("data: {dataset: {name: csv, path: /nonexistent/x.csv}}\n", [], "/nonexistent/x.csv"),
        ("strategy: {name: fedyogi, server_lrr: 1}\n", [], "did you mean 'server_lr'"),
        (
            "model: {name: tests.wrong_model:five_outputs}\n",
            [],
            "outputs shape (5,) per example but the dataset has 10",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, text, overrides, message):
    out = fedfleet("simulate", str(job(tmp_path, text)), *overrides, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "t").exists()  # nothing half-written


def test_diverging_loss_fails_clearly_and_marks_the_run_failed(tmp_path):
    out = fedfleet("simulate", str(job(tmp_path)), *SMALL, "--set", "client.lr=1e12", "--quiet", cwd=tmp_path)
    assert out.returncode == 2
    assert "diverged; lower the learning rate (client.lr)" in out.stderr
    assert "Traceback" not in out.stderr
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "failed"
    assert not (tmp_path / "runs" / "t" / "result.json").exists()


def test_run_folder_contents_and_refusal_to_overwrite(tmp_path):
    path = job(tmp_path, "output: {dir: %s, tensorboard: true}\n" % (tmp_path / "runs"))
    out = fedfleet("simulate", str(path), *SMALL, "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("final test accuracy: ")
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("round,")
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "model.safetensors").is_file() and (run / "checkpoint.safetensors").is_file()
    again = fedfleet("simulate", str(path), *SMALL, "--quiet", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_ctrl_c_saves_the_last_round_and_resume_gives_the_same_model(tmp_path):
    # enough rounds that the run cannot end before the signal: with one torch thread a round takes a few ms
    total = 400
    rounds = ["--set", f"rounds={total}", "--set", "data.clients=20", "--set", "cohort=4", "--set", "eval_every=0"]
    reference = job(tmp_path, "name: ref\n")
    reference.write_text(reference.read_text().replace("name: t\n", ""))
    done = fedfleet("simulate", str(reference), *rounds, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    path = job(tmp_path)
    run = tmp_path / "runs" / "t"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedfleet.cli.main",
            "simulate",
            str(path),
            *rounds,
            "--quiet",
            "--set",
            "output.checkpoint_every=1000",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background (`make test &`) ignores SIGINT, and a child inherits that: Python
        # then installs no KeyboardInterrupt handler and the run ignores the Ctrl-C this test sends
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and 3 <= status["round"] < total
    assert (run / "checkpoint.safetensors").is_file()  # saved on Ctrl-C although checkpoint_every=1000

    resumed = fedfleet("simulate", str(path), *rounds, "--quiet", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(run / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "ref" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, total + 1))


def test_the_demo_job_reaches_90_percent(tmp_path):
    root = ROOT
    out = fedfleet(
        "simulate",
        str(root / "examples" / "digits_fedavg.yaml"),
        "--set",
        f"output.dir={tmp_path}",
        "--quiet",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    accuracy = float(last.split(": ")[1].split("%")[0]) / 100
    assert accuracy >= 0.90, last
