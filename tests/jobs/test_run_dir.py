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


def test_resume_with_nothing_committed_starts_the_run_instead_of_refusing_for_good(tmp_path, capsys):
    """A crash before the first round committed leaves a run folder without a checkpoint; a supervisor that
    restarts with --resume must get a run, not the same error forever."""
    crashed = RunDir.prepare(tmp_path, "r")
    crashed.write_status("running", round=0)
    (crashed.path / "config.yaml").write_text("x")
    run = RunDir.prepare(tmp_path, "r", resume=True)
    assert list(run.path.iterdir()) == [] and "starting from round 1" in capsys.readouterr().err
    fresh = RunDir.prepare(tmp_path, "never-started", resume=True)
    assert fresh.path.is_dir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("x")
    with pytest.raises(ConfigError, match="not a fedfleet run folder"):
        RunDir.prepare(tmp_path, "mine", resume=True)
