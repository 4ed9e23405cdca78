"""The run folder: --overwrite removes what a run wrote and nothing else."""

import pytest

from fedfleet.errors import ConfigError
from fedfleet.jobs.run_dir import RunDir


def test_overwrite_refuses_a_folder_that_was_never_a_run(tmp_path):
    mine = tmp_path / "runs" / "digits-fedavg"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("three years of work")
    with pytest.raises(ConfigError, match="not a fedfleet run folder"):
        RunDir.prepare(tmp_path / "runs", "digits-fedavg", overwrite=True)
    assert (mine / "thesis.tex").read_text() == "three years of work"


def test_overwrite_removes_a_runs_files_and_keeps_the_users(tmp_path):
    run = RunDir.prepare(tmp_path, "r")
    run.write_status("finished")
    for name in ("metrics.csv", "config.yaml", "checkpoint.safetensors", "checkpoint.safetensors.tmp"):
        (run.path / name).write_text("x")
    (run.path / "tb").mkdir()
    (run.path / "tb" / "events").write_text("x")
    (run.path / "notes.md").write_text("my notes")
    again = RunDir.prepare(tmp_path, "r", overwrite=True)
    assert sorted(p.name for p in again.path.iterdir()) == ["notes.md"]
