"""DP-FedAvg in whole jobs: epsilon reported every round, the budget kept, a resumed run's epsilon and model the
uninterrupted one's, each refused combination named; distributed DP under secure aggregation and local DP."""

import itertools
import math

import pytest

from fedfleet.callbacks import CheckpointCallback, resume
from fedfleet.config import load_job
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.privacy import PrivacyBudgetSpent

PRIVACY = "{epsilon: 6, delta: 1.0e-5, clip: 0.5, noise: seeded}"


def job_file(tmp_path, privacy: str = PRIVACY, extra: str = "", rounds: int = 6):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(
        f"name: dp\nrounds: {rounds}\ncohort: 20\neval_every: {rounds}\n"
        "data: {dataset: digits, clients: 200, partition: {name: iid}}\nmodel: {name: mlp, hidden: [32]}\n"
        f"client: {{epochs: 1, batch_size: 10, lr: 0.2}}\noutput: {{dir: {tmp_path}}}\nprivacy: {privacy}\n{extra}"
    )
    return path


def simulate(tmp_path, **kw) -> Simulation:
    return Simulation.from_config(load_job(job_file(tmp_path, **kw)))


def test_epsilon_grows_every_round_and_ends_within_the_budget(tmp_path):
    history = simulate(tmp_path).loop.run()
    eps = [r.metrics["dp_epsilon"] for r in history]
    assert all(a < b for a, b in itertools.pairwise(eps)) and 5.9 < eps[-1] <= 6.0
    last = history[-1].metrics
    assert last["dp_epsilon_budget"] == 6.0 and last["dp_delta"] == 1e-5 and last["dp_clip"] == 0.5
    assert last["dp_noise_std"] == pytest.approx(last["dp_noise_multiplier"] * 0.5 / 20)
    sizes = {r.metrics["clients"] for r in history}
    assert len(sizes) > 1  # Poisson sampling: the cohort's size varies around 20
    assert last["test_accuracy"] > 0.1


def test_a_resumed_run_reports_the_uninterrupted_runs_epsilon_and_model(tmp_path):
    full = simulate(tmp_path / "full", rounds=4)
    full.loop.run()
    first = simulate(tmp_path / "first", rounds=4)
    first.loop.run_round(0)
    first.loop.run_round(1)
    (tmp_path / "ckpt").mkdir()
    CheckpointCallback(tmp_path / "ckpt", every=1).on_round_end(first.loop, first.loop.history[-1])
    resumed = simulate(tmp_path / "resumed", rounds=4)
    assert resume(resumed.loop, tmp_path / "ckpt") and resumed.loop.round == 2
    resumed.loop.run()
    assert resumed.loop.history[-1].metrics["dp_epsilon"] == full.loop.history[-1].metrics["dp_epsilon"]
    assert resumed.loop.global_params.allclose(full.loop.global_params, rtol=0, atol=0)


def test_a_round_past_the_budget_is_refused_before_it_trains(tmp_path):
    sim = simulate(tmp_path, privacy="{epsilon: 3, noise_multiplier: 1.0, accountant: rdp, noise: seeded}", rounds=50)
    with pytest.raises(PrivacyBudgetSpent, match=r"round \d+ would take epsilon .* past privacy.epsilon = 3"):
        sim.loop.run()
    done = sim.loop.history
    assert done and done[-1].metrics["dp_epsilon"] <= 3 and sim.loop.round == len(done) < 50


@pytest.mark.parametrize(
    "privacy, extra, message",
    [
        ("{epsilon: 4, where: distributed}", "", "add a secure_aggregation section"),
        ("{epsilon: 4}", "secure_aggregation: {clip: 1.0}\n", "use privacy.where: distributed"),
        ("{epsilon: 4}", "selector: {name: oort}\n", "use selector: uniform"),
        ("{epsilon: 4}", "fedbuff: {buffer: 5}\n", "fedbuff's asynchronous steps are not covered"),
        ("{epsilon: 4}", "system: {traces: {name: generate}}\n", "set privacy.sampling: none"),
        ("{epsilon: 4}", "transforms: {server: [{name: median}]}\n", "drop one of them"),
        ("{delta: 1.0e-5}", "", "privacy needs epsilon"),
        ("{epsilon: 4, where: local, adaptive: {}}", "", "privacy.adaptive needs each update's norm"),
        ("{epsilon: 4, sampling: fixed}", "", "with sampling fixed use rdp"),
        ("{epsilon: 4, sampling: sometimes}", "", "privacy.sampling"),
    ],
)
def test_combinations_that_break_the_guarantee_are_refused_by_key(tmp_path, privacy, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_job(job_file(tmp_path, privacy=privacy, extra=extra))


def test_a_secure_clip_range_that_would_cut_the_noise_is_refused_with_the_value_to_use(tmp_path):
    privacy = "{noise_multiplier: 4.0, clip: 0.5, where: distributed, sampling: none}"
    with pytest.raises(ConfigError, match=r"secure_aggregation.clip = 1 would clip .* at least 3\.18"):
        simulate(tmp_path, privacy=privacy, extra="secure_aggregation: {clip: 1.0}\n")


def test_adaptive_clipping_in_a_job_moves_the_clip_and_reports_its_noisy_fraction(tmp_path):
    privacy = "{noise_multiplier: 1.0, clip: 0.01, adaptive: {quantile: 0.5, lr: 0.5}, noise: seeded}"
    history = simulate(tmp_path, privacy=privacy).loop.run()
    clips = [r.metrics["dp_clip"] for r in history]
    assert clips[-1] > clips[0] and all("dp_unclipped_fraction" in r.metrics for r in history)


def test_distributed_dp_under_secure_aggregation_accounts_for_the_parties_that_survived(tmp_path):
    privacy = "{noise_multiplier: 1.0, clip: 0.5, where: distributed, sampling: none, noise: seeded}"
    extra = "secure_aggregation: {clip: 2.0, bits: 20}\nsystem: {traces: {name: generate, online_fraction: 0.6}}\n"
    sim = simulate(tmp_path, privacy=privacy, extra=extra, rounds=3)
    history = sim.loop.run()
    for record in history:
        m = record.metrics
        n = m["dp_parties"]
        assert n == m["clients"] and m["dp_noise_multiplier"] == pytest.approx(1.0 * math.sqrt(min(n, 20) / 20))
    assert history[-1].metrics["dp_epsilon"] > 0


def test_local_dp_noises_each_update_and_accounts_without_amplification(tmp_path):
    history = simulate(tmp_path, privacy="{noise_multiplier: 4.0, clip: 0.5, where: local, noise: seeded}").loop.run()
    m = history[-1].metrics
    assert m["dp_noise_multiplier"] == 2.0  # sensitivity 2C: a Gaussian of multiplier z / 2 per round
    assert m["clients"] == 20.0  # no Poisson draw: the job's uniform cohort
