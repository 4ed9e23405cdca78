"""Robust rules in whole runs: a digits job with attackers (FedAvg collapses, a defence holds), FedYogi's step
on a trimmed mean, a resumed run with centered clipping equal to an uninterrupted one, `fedfleet list`."""

import logging

import pytest
import torch

from fedfleet.callbacks import CheckpointCallback, resume
from fedfleet.cli.listing import list_command
from fedfleet.config import load_job
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate
from fedfleet.jobs.simulation import Simulation
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy
from fedfleet.transforms import JobFacts, build_pipeline
from tests.core.test_loop import ScriptedRuntime
from tests.robust.helpers import aggregate, honest, result, with_attackers

ATTACKERS = "{name: gaussian, fraction: 0.2, sigma: 3.0}"  # 6 of 30 clients send N(0, 9) noise


def digits_job(tmp_path, server: str = "", strategy: str = "fedavg", rounds: int = 8):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"name: robust\nrounds: {rounds}\ncohort: 15\neval_every: {rounds}\n"
        "data: {dataset: digits, clients: 30, partition: {name: iid}}\nmodel: {name: mlp}\n"
        f"strategy: {strategy}\nclient: {{epochs: 2, batch_size: 10, lr: 0.3}}\noutput: {{dir: {tmp_path}}}\n"
        f"transforms: {{client: [{ATTACKERS}], server: [{server}]}}\n"
    )
    return Simulation.from_config(load_job(path))


def final_accuracy(sim) -> float:
    return sim.loop.run()[-1].metrics["test_accuracy"]


def test_fedavg_collapses_under_gaussian_attackers_and_the_median_holds(tmp_path, caplog):
    """8 rounds of 15 of 30 digits clients, 20% of them attackers: FedAvg stays near chance (0.1), the
    coordinate-wise median reaches about what FedAvg reaches without attackers (0.9)."""
    assert final_accuracy(digits_job(tmp_path)) < 0.3
    median = digits_job(tmp_path, "{name: median}")
    history = median.loop.run()
    assert history[-1].metrics["test_accuracy"] > 0.8
    shown = history[-1].metrics
    assert 0 < shown["train_attacker"] < 1  # the attackers' weight share in the round
    assert shown["train_robust_flagged"] >= 1
    assert shown["train_robust_dist_max"] > 10 * shown["train_robust_dist_median"]  # the noise, far out
    # beta 0.2 trims 3 per end of 15, and some cohorts draw more than 3 of the 6 attackers: it holds, less well
    assert final_accuracy(digits_job(tmp_path, "{name: trimmed_mean, beta: 0.2}")) > 0.6


def test_fedyogi_steps_on_the_trimmed_mean():
    """The strategy's server step sees the rule's aggregate: FedYogi on a trimmed mean equals FedYogi's step
    applied by hand to the trimmed mean of the same updates."""
    rows = with_attackers(honest(12), 3, "flip_scale_100")
    yogi = build_strategy("fedyogi")
    out = aggregate("trimmed_mean", {"beta": 0.2}, rows, strategy="fedyogi")
    by_hand = aggregate("trimmed_mean", {"beta": 0.2}, rows)
    assert torch.equal(result(out), result(by_hand))
    w1, w2 = FlatParams.from_tensors({"w": torch.zeros(64)}), FlatParams.from_tensors({"w": torch.zeros(64)})
    s1, s2 = yogi.init_state(w1), yogi.init_state(w2)
    yogi.server_step(w1, out, s1)
    yogi.server_step(w2, Aggregate(by_hand.params.clone(), by_hand.weight, by_hand.count), s2)
    assert w1.allclose(w2, rtol=0, atol=0)
    plain = aggregate("median", {}, rows[3:])  # sanity: not the attackers' pull
    assert (result(out) - result(plain)).norm() < 0.2 * result(plain).norm()


def test_a_digits_job_runs_fedyogi_on_a_trimmed_mean(tmp_path):
    sim = digits_job(tmp_path, "{name: trimmed_mean, beta: 0.2}", strategy="{name: fedyogi, server_lr: 0.03}")
    assert final_accuracy(sim) > 0.5


def centered_loop(rounds, callbacks=()):
    pipeline = build_pipeline(server=[("centered_clip", {"tau": 1.5, "iters": 1})], job=JobFacts(cohort=3))
    return RoundLoop(
        build_strategy("fedavg"),
        ScriptedRuntime(8),
        UniformSelector(),
        FlatParams.from_tensors({"w": torch.zeros(2)}),
        FitConfig(),
        LoopConfig(rounds=rounds, cohort=3, seed=0, eval_every=0),
        callbacks,
        pipeline=pipeline,
    )


def test_a_resumed_run_with_centered_clipping_equals_the_uninterrupted_one(tmp_path, caplog):
    full = centered_loop(4)
    full.run()
    first = centered_loop(4)
    first.run_round(0)
    first.run_round(1)
    CheckpointCallback(tmp_path, every=1).on_round_end(first, first.history[-1])
    resumed = centered_loop(4)
    with caplog.at_level(logging.WARNING):
        assert resume(resumed, tmp_path) and resumed.round == 2
    assert not caplog.records
    resumed.run()
    assert resumed.global_params.allclose(full.global_params, rtol=0, atol=0)
    forgetful = centered_loop(4)  # the same checkpoint without the centre: a different model
    assert resume(forgetful, tmp_path)
    forgetful.pipeline.server[0].load_state_dict({})
    forgetful.run()
    assert not forgetful.global_params.allclose(full.global_params, rtol=0, atol=1e-6)


def test_the_adaptive_norm_bound_learns_from_earlier_rounds_and_its_memory_resumes(tmp_path):
    pipeline = build_pipeline(server=[("norm_bound", {"multiplier": 1.0, "window": 4})], job=JobFacts(cohort=3))
    (bound,) = pipeline.server
    assert not bound.mergeable and build_pipeline(server=[("norm_bound", {"max_norm": 1.0})]).mergeable
    like = FlatParams.from_tensors({"w": torch.zeros(2)})
    for norms in ([3.0, 4.0, 5.0], [1.0, 100.0, 2.0]):
        agg = pipeline.aggregator(build_strategy("fedavg"), like)
        for n in norms:
            agg.add(aggregate_update(n))
        out = agg.finish()
    assert out.metrics["robust_bound"] == 4.0 and out.metrics["robust_clipped"] == 1  # median of 3, 4, 5
    assert bound.state_dict() == {"norms": [5.0, 1.0, 100.0, 2.0]}  # the last 4, raw
    fresh = build_pipeline(server=[("norm_bound", {"multiplier": 1.0, "window": 4})])
    fresh.load_state_dict(pipeline.state_dict())
    assert fresh.server[0].bound() == bound.bound() == 3.5


def aggregate_update(norm: float):
    from fedfleet.core.update import Update

    return Update(FlatParams.from_tensors({"w": torch.tensor([norm, 0.0])}), 1.0)


def test_fedfleet_list_states_each_rules_memory(capsys):
    list_command("server-transforms")
    out = capsys.readouterr().out
    assert "krum, median, norm_bound, trimmed_mean" in out
    block = out.split("  krum ", 1)[1].split("\n  ", 3)
    assert "keys: " in block[1] and "f, m" in block[1]
    assert "memory: K x model" in block[2] and "spill_mb" in block[2]
    assert "memory: O(model), one update at a time" in out.split("  norm_bound ", 1)[1]


@pytest.mark.parametrize("rule", ["median", "krum"])
def test_a_spilling_job_runs_and_cleans_up(tmp_path, rule):
    spill = tmp_path / "spill"
    spill.mkdir()
    params = "f: 3, " if rule == "krum" else ""
    sim = digits_job(tmp_path, f"{{name: {rule}, {params}spill_mb: 0, spill_dir: {spill}}}", rounds=2)
    history = sim.loop.run()
    assert history[-1].metrics["train_robust_spilled_mb"] > 0
    assert list(spill.iterdir()) == []
