"""Checkpoints, metrics files and early stopping on a real RoundLoop with a scripted runtime."""

import csv
import json

import pytest
import torch

from fedfleet.callbacks import CheckpointCallback, EarlyStopping, MetricsFileCallback, ProgressCallback, resume
from fedfleet.core.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from fedfleet.core.loop import RoundRecord
from fedfleet.core.params import FlatParams
from tests.core.test_loop import make_loop


def test_checkpoint_round_trip_with_two_dtypes_and_state(tmp_path):
    loop, _ = make_loop(rounds=2, strategy="fedadam")
    loop.global_params = FlatParams.from_tensors(
        {"w": torch.tensor([1.0, 2.0]), "d": torch.tensor([3.0], dtype=torch.float64)}
    )
    loop.state = {"m": loop.global_params.clone().mul_(2), "v": loop.global_params.clone().mul_(3)}
    loop.round, loop.history = 2, [RoundRecord(0, {"a": 1.0}), RoundRecord(1, {"a": 2.0})]
    save_checkpoint(tmp_path / "c.safetensors", loop.snapshot())
    snap = load_checkpoint(tmp_path / "c.safetensors", loop.global_params, loop.state)
    assert snap["round"] == 2 and snap["history"][1]["metrics"] == {"a": 2.0}
    assert snap["global"].allclose(loop.global_params, rtol=0, atol=0)
    assert snap["state"]["v"].allclose(loop.state["v"], rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))
    other = FlatParams.from_tensors({"w": torch.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match="different model"):
        load_checkpoint(tmp_path / "c.safetensors", other, {})


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    loop, _ = make_loop(rounds=1)
    loop.run()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, loop.snapshot())
    before = path.read_bytes()
    import fedfleet.core.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "fsync_replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, loop.snapshot())
    assert path.read_bytes() == before


def test_checkpoint_every_k_rounds_and_resume(tmp_path):
    full, _ = make_loop(rounds=4)
    full.run()
    loop, _ = make_loop(rounds=4, callbacks=[CheckpointCallback(tmp_path, every=3)])
    loop.run_round(0)
    loop.run_round(1)
    loop.run_round(2)
    CheckpointCallback(tmp_path, every=3).on_round_end(loop, loop.history[-1])
    fresh, _ = make_loop(rounds=4)
    assert resume(fresh, tmp_path) and fresh.round == 3
    fresh.run()
    assert fresh.global_params.allclose(full.global_params, rtol=0, atol=0)
    assert not resume(make_loop()[0], tmp_path / "nothing-here")


def test_metrics_files_widen_and_resume_without_duplicates(tmp_path):
    loop, _ = make_loop(rounds=3, eval_every=2, callbacks=[MetricsFileCallback(tmp_path)])
    loop.run()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["test_sum"] == "" and rows[1]["test_sum"] != ""  # the column appeared in round 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    # a resumed run rewrites both files from the restored history, then appends
    resumed, _ = make_loop(rounds=4, eval_every=2, callbacks=[MetricsFileCallback(tmp_path)])
    resumed.restore({**loop.snapshot(), "global": loop.global_params.clone()})
    resumed.history = resumed.history[:2]
    resumed.round = 2
    resumed.run()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4]


def test_early_stopping_counts_evaluations_only():
    stopper = EarlyStopping(metric="test_sum", mode="min", patience=2)
    loop, _ = make_loop(rounds=20, eval_every=1, callbacks=[stopper])
    loop.run()  # the scripted sum only grows: best at round 1, stop after 2 more evaluations
    assert loop.round == 3
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")


def test_progress_prints_plain_rows_off_a_terminal():
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    loop, _ = make_loop(rounds=2, callbacks=[ProgressCallback(Console(file=buf, width=100), columns=("test_sum",))])
    loop.run()
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["round", "test_sum"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"]


def test_progress_column_follows_the_metric_the_task_reports():
    """A click model's table shows its AUC once evaluated (the header printed again); a classifier's keeps accuracy."""
    from io import StringIO
    from types import SimpleNamespace

    from rich.console import Console

    from fedfleet.callbacks import OneOf
    from fedfleet.core.loop import RoundRecord

    def table(*rounds):
        buf = StringIO()
        column = OneOf(("test_auc", "test_accuracy"), until_seen="test_accuracy")
        progress = ProgressCallback(Console(file=buf, width=100), columns=("train_loss", column))
        loop = SimpleNamespace(unit="round", round=0, config=SimpleNamespace(rounds=len(rounds)))
        progress.on_run_start(loop)
        for i, metrics in enumerate(rounds):
            progress.on_round_end(loop, RoundRecord(i, metrics))
        return [line.split() for line in buf.getvalue().splitlines()]

    clicks = table({"train_loss": 0.7}, {"train_loss": 0.6, "test_accuracy": 0.55, "test_auc": 0.71},
                   {"train_loss": 0.5, "test_accuracy": 0.55, "test_auc": 0.74})  # fmt: skip
    header = ["round", "train_loss"]
    assert clicks == [[*header, "test_accuracy"], ["1", "0.7000"],
                      [*header, "test_auc"], ["2", "0.6000", "0.7100"], ["3", "0.5000", "0.7400"]]  # fmt: skip
    classes = table({"train_loss": 0.7}, {"train_loss": 0.6, "test_accuracy": 0.8})
    assert classes == [["round", "train_loss", "test_accuracy"], ["1", "0.7000"], ["2", "0.6000", "80.00%"]]
