"""Secure aggregation inside the round loop: the simulation's rounds, their dropouts and the virtual clock."""

import numpy as np
import pytest
import torch

from fedfleet.config import load_job
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.secagg import InProcessSecureSum, SecAggConfig
from tests.paths import EXAMPLES

CONFIG = SecAggConfig(neighbours=8, threshold=5, clip=2.0, bits=20, max_weight=100.0)


def updates(n: int, seed: int = 0) -> list[Update]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n):
        params = FlatParams.from_tensors({"w": torch.randn(30, 7, generator=g), "b": torch.randn(7, generator=g)})
        out.append(Update(params, float(5 + 7 * c), {"loss": float(c)}, client_id=c))
    return out


def weighted_mean(ups: list[Update], config: SecAggConfig) -> FlatParams:
    total = ups[0].params.zeros_like()
    weight = 0.0
    for u in ups:
        w = min(u.weight, config.max_weight)
        clipped = FlatParams(
            u.params.spec, {d: b.clamp(-config.clip, config.clip) for d, b in u.params.buffers.items()}
        )
        total.add_(clipped, alpha=w)
        weight += w
    return total.mul_(1 / weight)


def max_diff(a: FlatParams, b: FlatParams) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.buffers.values(), b.buffers.values(), strict=True))


def test_the_unmasked_mean_is_the_weighted_mean_of_who_delivered_within_the_bound_dropouts_included():
    ups = updates(12)
    cohort = list(range(13))  # 12 was asked and shared, and never delivered: it dropped after its shares
    gone_at_unmask = {3}  # delivered, then offline when the unmask request came: its input still counts
    agg = InProcessSecureSum(
        CONFIG, ups[0].params, cohort, round=2, seed=7, offline_at_unmask=lambda delivered: gone_at_unmask
    )
    for u in ups:
        agg.add(u)
    out = agg.finish()
    expected = weighted_mean(ups, CONFIG)
    assert out.count == 12 and out.weight == pytest.approx(sum(min(u.weight, 100.0) for u in ups), rel=1e-6)
    assert 0 < max_diff(out.params, expected) <= agg.mean_bound < 1e-4
    assert out.metrics["loss"] == pytest.approx(np.average(range(12), weights=[u.weight for u in ups]))


def test_a_client_that_was_not_asked_is_refused_and_too_few_deliveries_fail_the_round():
    ups = updates(4)
    agg = InProcessSecureSum(CONFIG, ups[0].params, list(range(10)), round=0, seed=0)
    with pytest.raises(ValueError, match="client 99 was not asked"):
        agg.add(Update(ups[0].params, 1.0, {}, client_id=99))
    for u in ups[:4]:  # 4 of 10 delivered: below the threshold of 5
        agg.add(u)
    from fedfleet.core.loop import RoundIncomplete

    with pytest.raises(RoundIncomplete):  # the loop runs the round again, nothing is folded
        agg.finish()


SHORT = ["rounds=1", "eval_every=1", "output.tensorboard=false"]
SECURE = ["secure_aggregation.bits=22", "secure_aggregation.clip=4", "secure_aggregation.neighbours=6"]


def test_a_secure_simulated_round_gives_the_plain_model_within_the_quantisation_bound():
    plain = Simulation.from_config(load_job(EXAMPLES / "digits_fedavg.yaml", SHORT))
    plain.loop.run()
    secure = Simulation.from_config(load_job(EXAMPLES / "digits_fedavg.yaml", SHORT + SECURE))
    secure.loop.run()
    # ten clients, each quantised in steps of 8 / 2**22: the mean moves by at most a few steps
    assert 0 < max_diff(plain.loop.global_params, secure.loop.global_params) < 1e-4
    record = secure.loop.history[-1].metrics
    assert record["clients"] == 10 and record["sim_aggregation_s"] > 0
    assert record["sim_round_s"] > plain.loop.history[-1].metrics["sim_round_s"]  # three more exchanges


def test_dropouts_from_the_availability_trace_and_over_commitment_do_not_stop_secure_rounds():
    """digits_oort_system asks 13 clients and keeps the first 10: the 3 late ones dropped after sharing."""
    over = ["rounds=3", "eval_every=3", "output.tensorboard=false", "secure_aggregation.bits=20"]
    sim = Simulation.from_config(load_job(EXAMPLES / "digits_oort_system.yaml", over))
    history = sim.loop.run()
    assert [r.metrics["clients"] for r in history] == [10, 10, 10]
    assert all(r.metrics["sim_aggregation_s"] > 0 for r in history)
    assert np.isfinite(history[-1].metrics["test_accuracy"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["secure_aggregation.neighbours=10"], r"neighbours \(k\) must be an int with 1 <= k < n = 10"),
        (["secure_aggregation.threshold=2", "secure_aggregation.neighbours=6"], r"k/2 < t <= k"),
        (
            ["secure_aggregation.bits=48", "cohort=70000"],
            r"overflows the 64-bit ring for n = 70000 parties.*bits <= 47",
        ),
        (["secure_aggregation.bits=60"], r"bits must be an int in 1\.\.48"),
        (["fedbuff.buffer=5"], "fedbuff folds arrivals one by one"),
    ],
)
def test_bad_secure_aggregation_settings_are_one_clear_message_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job(EXAMPLES / "digits_fedavg.yaml", ["secure_aggregation.bits=16", *overrides])


def test_strategies_and_fold_transforms_that_need_each_update_are_refused():
    job = load_job(EXAMPLES / "digits_fedavg.yaml", [*SHORT, "secure_aggregation.bits=16", "strategy.name=qfedavg"])
    with pytest.raises(ConfigError, match="needs each update"):
        Simulation.from_config(job).loop.run()
    job = load_job(EXAMPLES / "digits_fedavg.yaml", [*SHORT, "secure_aggregation.bits=16"])
    from dataclasses import replace

    from fedfleet.config.loader import Named
    from fedfleet.config.schema import TransformsConfig

    clipped = replace(job, transforms=TransformsConfig(server=(Named("clip", {"max_norm": 1.0}),)))
    with pytest.raises(ConfigError, match=r"fold transforms .* cannot see them"):
        Simulation.from_config(clipped)


def test_a_runtime_whose_parties_are_elsewhere_is_refused_rather_than_summing_plain_updates():
    """A gRPC runtime not built for secure aggregation (it would run plain rounds, and the in-process sum would see
    every update at the arbiter) is refused; one built with it runs the protocol itself (tests/runtime/grpc)."""
    from fedfleet.core.loop import RoundLoop
    from fedfleet.runtime.grpc.runtime import GrpcRuntime

    sim = Simulation.from_config(load_job(EXAMPLES / "digits_fedavg.yaml", [*SHORT, "secure_aggregation.bits=16"]))
    loop = sim.loop
    remote = type("Remote", (GrpcRuntime,), {"population": 10, "__init__": lambda self: None})  # no server
    with pytest.raises(ConfigError, match="not available on Remote"):
        RoundLoop(loop.strategy, remote(), loop.selector, loop.global_params, loop.fit_config, loop.config,
                  pipeline=loop.pipeline)  # fmt: skip
