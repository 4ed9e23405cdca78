"""Hugging Face parties sharing one process (issue 14 item 17): accelerate's AcceleratorState, transformers'
DeepSpeed config and torch's random generator are one per process, so what cannot be kept apart is refused with
the fix, and what can (one DeepSpeed party without a launcher, a plain party after a DeepSpeed one) works.

DeepSpeed leaves process-wide traces (a process group, environment variables), so its cases run in a child
process (tests/hf_inprocess_deepspeed.py), one case each; the plain cases run here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, LocalFederation
from tests.hf_parties import make_client, review_shares
from tests.paths import ROOT

FIX = "build every in-process party in one thread"


def test_parties_built_in_their_own_threads_are_refused_and_the_others_told_at_once(tmp_path):
    """FATE's run_client() per role, each in a thread: the builds race on torch's random generator (the first
    party's weights, everyone's start, differed run to run) and on accelerate's state, which each
    TrainingArguments resets (AcceleratorState errors, DeepSpeed dropped in 2 of 3 runs)."""
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2, timeout=60)
    outcome: dict[int, BaseException | None] = {}
    first_built = threading.Event()

    def run_client(i):
        try:
            if i == 1:
                first_built.wait(60)  # the second build comes second, so the test knows which is refused
            client, *_ = make_client(fed.context(i), csvs[i], i, FedArguments("epoch", 1), tmp_path / f"p{i}", 1)
            if i == 0:
                first_built.set()
            client.train()
            outcome[i] = None
        except BaseException as exc:
            outcome[i] = exc
            first_built.set()

    started = time.monotonic()
    threads = [threading.Thread(target=run_client, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert isinstance(outcome[1], ConfigError)
    assert "party-1 is built in another thread than party-0" in str(outcome[1])
    assert FIX in str(outcome[1])
    assert isinstance(outcome[0], RuntimeError)  # told why, instead of waiting out the 60 s timeout
    assert "party-1 is built in another thread" in str(outcome[0])
    assert time.monotonic() - started < 45


class Party:
    """Stands for a party in claim()'s books (kept by weak reference)."""


def test_a_party_failing_on_the_reset_before_the_refusal_is_told_the_refusal():
    """The race CI met: the second thread's TrainingArguments reset accelerate's state, the first party failed
    on it (AttributeError) a moment before the second build was refused; it waits for that refusal, briefly."""
    from fedfleet.hf import inprocess

    fed = LocalFederation(2, timeout=60)
    first, second = Party(), Party()
    inprocess.claim(first, fed.context(0), None)
    refused: list[BaseException] = []

    def build_second():
        time.sleep(0.3)
        try:
            inprocess.claim(second, fed.context(1), None)
        except ConfigError as exc:
            refused.append(exc)

    thread = threading.Thread(target=build_second)
    thread.start()
    trace = AttributeError("'AcceleratorState' object has no attribute 'parallelism_config'")
    with pytest.raises(RuntimeError, match="party-1 is built in another thread") as told:
        inprocess.explain_failure(fed.context(0), trace)
    thread.join()
    assert told.value.__cause__ is trace and len(refused) == 1


def test_a_failure_with_every_party_built_and_none_refused_is_its_own():
    from fedfleet.hf import inprocess

    fed = LocalFederation(2, timeout=60)
    for i in range(2):
        inprocess.claim(Party(), fed.context(i), None)
    started = time.monotonic()
    inprocess.explain_failure(fed.context(0), ValueError("a bug of the party's own"))  # returns: re-raised by train
    assert time.monotonic() - started < 0.5
    unbuilt = LocalFederation(2, timeout=60)
    inprocess.claim(Party(), unbuilt.context(0), None)
    inprocess.explain_failure(unbuilt.context(0), ValueError("a bug"), grace_s=0.2)  # no refusal came: its own


def test_parties_built_in_one_thread_and_trained_in_threads_are_not_refused(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2, timeout=60)
    built = []
    thread = threading.Thread(
        target=lambda: built.extend(
            make_client(fed.context(i), csvs[i], i, FedArguments("epoch", 1), tmp_path / f"q{i}", 1)[0]
            for i in range(2)
        )
    )
    thread.start()  # not necessarily the main thread: one thread for all of them
    thread.join(60)
    from tests.hf.test_hf_local_federation import train_all

    assert train_all(built) == [None, None]


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def child(case: str, tmp_path) -> dict:
    """Run one case of tests/hf_inprocess_deepspeed.py in a fresh process without any launcher variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "tests.hf_inprocess_deepspeed", case, str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_deepspeed
def test_one_deepspeed_party_runs_in_process_without_a_launcher(tmp_path):
    """It used to fail in DeepSpeed's MPI discovery (No module named 'mpi4py')."""
    out = child("alone", tmp_path)
    assert out["error"] is None
    assert out["deepspeed"] and out["access"] == "DeepSpeedAccess" and out["syncs"] == 1
    assert out["env"] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@needs_deepspeed
def test_the_fate_tutorial_s_warmup_lr_runs_with_the_training_arguments_numbers(tmp_path):
    """Its ds_config's WarmupLR and Adam numbers disagree with TrainingArguments: transformers refused to train."""
    out = child("fate-warmup", tmp_path)
    assert out["error"] is None and out["deepspeed"]
    assert out["scheduler"] == {"warmup_min_lr": 0, "warmup_max_lr": 2e-3, "warmup_num_steps": 1}
    assert out["micro_batch"] == 8 and out["lr"] == 2e-3
    assert "scheduler.params.warmup_max_lr=3e-05" in out["log"] and "learning_rate=0.002" in out["log"]


@needs_deepspeed
def test_a_second_deepspeed_party_in_the_process_is_refused(tmp_path):
    """Both ran the last-built party's DeepSpeed plugin: a ZeRO-1 party ran ZeRO-3, a batch of 8 ran as 4."""
    out = child("two", tmp_path)
    assert "party-1 would share this process with party-0" in out["error"]
    assert "one DeepSpeed party per process" in out["error"]
    assert "party-1 would share this process" in out["other"]  # party 0 raised too, at once
    assert out["seconds"] < 60


@needs_deepspeed
def test_a_plain_party_beside_a_deepspeed_one_is_refused(tmp_path):
    """A plain party built after a DeepSpeed one trained under DeepSpeed; built first, it crashed."""
    out = child("mixed", tmp_path)
    assert "party-1 would share this process with party-0" in out["error"]


@needs_deepspeed
def test_a_plain_party_after_a_deepspeed_run_trains_without_deepspeed(tmp_path):
    """accelerate's Accelerator leaves ACCELERATE_USE_DEEPSPEED=true behind: the next plain Trainer got DeepSpeed."""
    out = child("after", tmp_path)
    assert out["error"] is None
    assert out["runs"] == [True, False]
