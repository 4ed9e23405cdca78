"""A fold transform that needs the strategy's weighted mean is refused when the job is assembled, before any
client trains (it used to be refused at round 1, after the first cohort's training)."""

import pytest

from fedfleet.config import load_job
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.privacy import PrivacyBudgetSpent


def job(tmp_path, extra: str):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: pre\nrounds: 2\ncohort: 10\ndata: {dataset: digits, clients: 100}\nmodel: {name: mlp, hidden: [8]}\n"
        f"output: {{dir: {tmp_path}}}\n{extra}"
    )
    return load_job(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("strategy: {name: qfedavg}\ntransforms: {server: [{name: median}]}\n", "replaces the round's weighted mean"),
        ("strategy: {name: qfedavg}\nprivacy: {noise_multiplier: 1.0}\n", "weighted mean of clipped deltas"),
    ],
)
def test_a_fold_transform_without_a_mean_to_work_on_is_refused_before_training(tmp_path, monkeypatch, extra, message):
    from fedfleet.client import TorchTrainer

    monkeypatch.setattr(TorchTrainer, "fit", lambda *a, **k: pytest.fail("a client trained"))
    with pytest.raises(ConfigError, match=message):
        Simulation.from_config(job(tmp_path, extra))


def test_a_budget_too_small_for_one_round_is_refused_at_assembly(tmp_path):
    with pytest.raises(PrivacyBudgetSpent, match="round 1 would take epsilon"):
        Simulation.from_config(job(tmp_path, "privacy: {epsilon: 0.01, noise_multiplier: 1.0}\n"))
