"""The virtual clock with traces, the round-end policies, and how the loop plans, drops and reports."""

import dataclasses

import numpy as np
import pytest
import torch

from fedfleet.client.torch_trainer import batch_indices
from fedfleet.core.clock import DeviceProfile, VirtualClock, planned_samples
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.core.round_end import Deadline, OverCommit, WaitForAll, build_round_end
from fedfleet.core.update import TrainStats, Update
from fedfleet.errors import ConfigError
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy
from fedfleet.traces import Availability, DeviceCapacity, SystemTraces

MB = 1_000_000


def capacity(spp, down, up) -> DeviceCapacity:
    return DeviceCapacity(np.array(spp, dtype=float), np.array(down, dtype=float), np.array(up, dtype=float))


def always_online(n: int, period: float = 1000.0) -> Availability:
    return Availability(np.arange(n + 1), np.zeros(n), np.full(n, period), np.full(n, period))


# -- arithmetic ------------------------------------------------------------------------------------
def test_latency_is_download_plus_compute_plus_upload():
    # 1 MB down at 0.5 MB/s (2 s) + 100 samples x 2 epochs x 0.01 s (2 s) + 0.5 MB up at 0.25 MB/s (2 s) = 6 s
    clock = VirtualClock(traces=SystemTraces(capacity([0.01], [0.5 * MB], [0.25 * MB])))
    samples = planned_samples(np.array([100]), FitConfig(epochs=2))
    assert samples.tolist() == [200.0]
    assert clock.latencies(np.array([0]), samples, MB, MB // 2).tolist() == pytest.approx([6.0], rel=1e-12)
    assert clock.client_latency(0, 200, MB, MB // 2) == pytest.approx(6.0, rel=1e-12)
    default = VirtualClock()  # no traces: one default phone for everyone, as before
    assert default.client_latency("party-a", 10, 0, 0) == pytest.approx(10 * DeviceProfile().seconds_per_sample)
    assert default.online_clients() is None and default.time_online(np.array([0, 1])).tolist() == [np.inf] * 2


@pytest.mark.parametrize("n", [1, 7, 10, 23])
@pytest.mark.parametrize("config", [FitConfig(epochs=3, batch_size=5), FitConfig(steps=4, batch_size=5)])
def test_planned_samples_are_what_the_trainer_trains(n, config):
    gen = torch.Generator().manual_seed(0)
    trained = sum(len(b) for b in batch_indices(n, config, gen, torch.device("cpu")))
    assert planned_samples(np.array([n]), config).tolist() == [float(trained)]


# -- round-end policies ----------------------------------------------------------------------------
LATENCY = np.array([1.0, 5.0, 3.0, 8.0])
ONLINE_FOR = np.array([np.inf, np.inf, 2.0, np.inf])  # client 2 goes offline at 2 s, before it finishes at 3 s


def test_wait_for_all_waits_for_the_slowest_and_drops_the_offline_one():
    out = WaitForAll().decide(4, LATENCY, ONLINE_FOR)
    assert out.keep.tolist() == [True, True, False, True]
    assert out.offline.tolist() == [False, False, True, False]
    assert out.duration == 8.0


def test_deadline_cuts_stragglers():
    out = Deadline(4.0).decide(4, LATENCY, ONLINE_FOR)
    assert out.keep.tolist() == [True, False, False, False]
    assert out.offline.tolist() == [False, False, True, False]
    assert out.late.tolist() == [False, True, False, True]
    assert out.duration == 4.0
    assert Deadline(10.0).decide(4, LATENCY, ONLINE_FOR).duration == 8.0  # everyone in before the deadline


def test_overcommit_keeps_the_first_k_to_finish():
    policy = OverCommit(factor=0.5)
    assert policy.cohort_size(2) == 3
    assert OverCommit(0.3).cohort_size(100) == 130  # not 131: 100 * 1.3 is 130.00000000000003
    out = policy.decide(2, LATENCY, ONLINE_FOR)
    assert out.keep.tolist() == [True, True, False, False]
    assert out.duration == 5.0  # the 2nd completion (FedScale's round duration)
    assert out.offline.tolist() == [False, False, True, False] and out.late.tolist() == [False, False, False, True]
    few = policy.decide(4, LATENCY, ONLINE_FOR)  # only 3 can finish: the server waits for all of them
    assert few.keep.tolist() == [True, True, False, True] and few.duration == 8.0


def test_round_end_registry_checks_parameters():
    assert isinstance(build_round_end("deadline", seconds=3), Deadline)
    with pytest.raises(ConfigError, match="seconds must be > 0"):
        build_round_end("deadline", seconds=-1)
    with pytest.raises(ConfigError, match=r"unknown round-end policy 'dedline'.*did you mean 'deadline'"):
        build_round_end("dedline")


# -- the loop with traces --------------------------------------------------------------------------
class SizedRuntime:
    """Client c holds sizes[c] examples and sends the delta [c, c]; records whom it trained."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes)
        self.population = len(sizes)
        self.trained: list[list[int]] = []

    def fit(self, global_params, clients, config):
        self.trained.append([int(c) for c in clients])
        for c in clients:
            samples = float(planned_samples(self.sizes[[c]], config)[0])
            delta = FlatParams.from_tensors({"w": torch.full((2,), float(c))})
            stats = TrainStats(samples=samples, loss=1.0 + c)
            yield Update(delta, weight=float(self.sizes[c]), client_id=int(c), stats=stats)

    def round_metrics(self):
        return {}

    def evaluate(self, global_params):
        return {"sum": float(global_params.buffers[torch.float32].sum())}


class Recorder(UniformSelector):
    """Uniform selection that keeps the feedback the loop reports."""

    def __init__(self):
        object.__setattr__(self, "seen", [])

    def observe(self, round, feedback):
        self.seen.append((round, feedback))


def system_loop(traces, sizes, round_end=None, cohort=4, rounds=1, selector=None, **config):
    runtime = SizedRuntime(sizes)
    params = FlatParams.from_tensors({"w": torch.zeros(2)})
    loop = RoundLoop(
        build_strategy("fedavg"),
        runtime,
        selector or UniformSelector(),
        params,
        FitConfig(epochs=1, lr=1.0),
        LoopConfig(rounds=rounds, cohort=cohort, seed=0, **config),
        clock=VirtualClock(traces=traces),
        round_end=round_end,
        client_sizes=np.asarray(sizes),
    )
    return loop, runtime


# 4 clients, 100 samples each at 0.01 s, fast links: latencies 1, 5, 3, 8 s (nbytes of 2 floats is negligible)
FOUR = capacity([0.01, 0.05, 0.03, 0.08], [1e12] * 4, [1e12] * 4)


def test_loop_trains_only_the_clients_that_count_and_reports_the_drops():
    offline_at_2 = Availability(
        np.array([0, 1, 2, 3, 4]), np.zeros(4), np.array([100.0, 100.0, 2.0, 100.0]), np.full(4, 100.0)
    )
    loop, runtime = system_loop(SystemTraces(FOUR, offline_at_2), [100] * 4, Deadline(6.0))
    record = loop.run()[0]
    assert runtime.trained == [[0, 1]]  # client 2 drops offline, client 3 would take 8 s: neither is trained
    m = record.metrics
    assert m["selected"] == 4 and m["clients"] == 2 and m["online"] == 4
    assert m["dropped_offline"] == 1 and m["dropped_late"] == 1
    assert m["sim_round_s"] == pytest.approx(6.0) and m["sim_time_s"] == pytest.approx(6.0)
    assert m["wall_time_s"] >= m["wall_s"] > 0


def test_overcommitted_loop_keeps_the_first_k():
    loop, runtime = system_loop(SystemTraces(FOUR), [100] * 4, OverCommit(factor=1.0), cohort=2)
    record = loop.run()[0]
    assert runtime.trained == [[0, 2]]  # 4 asked, the two fastest (1 s and 3 s) count
    assert record.metrics["sim_round_s"] == pytest.approx(3.0)
    assert record.metrics["dropped_late"] == 2


def test_wait_for_all_with_traces_matches_the_slowest_client():
    loop, runtime = system_loop(SystemTraces(FOUR, always_online(4)), [100, 100, 100, 50], cohort=4)
    record = loop.run()[0]
    assert runtime.trained == [[0, 1, 2, 3]]
    assert record.metrics["sim_round_s"] == pytest.approx(5.0)  # client 3 has half the data: 4 s


def test_only_checked_in_clients_are_selected_and_the_server_waits_for_a_check_in():
    period = 100.0
    # clients 0-2 online in [10, 50], clients 3-5 in [60, 90]: nobody at t = 0
    a = Availability(
        np.arange(7), np.array([10.0] * 3 + [60.0] * 3), np.array([50.0] * 3 + [90.0] * 3), np.full(6, period)
    )
    caps = capacity([0.01] * 6, [1e12] * 6, [1e12] * 6)
    loop, runtime = system_loop(SystemTraces(caps, a), [100] * 6, cohort=2, rounds=1)
    record = loop.run()[0]
    assert set(runtime.trained[0]) <= {0, 1, 2}
    assert record.metrics["online"] == 3
    assert record.metrics["sim_time_s"] == pytest.approx(10.0 + 1.0)  # waited 10 s for a check-in, trained 1 s
    assert record.metrics["sim_wait_s"] == pytest.approx(10.0)


class FirstK:
    """A user's selector that knows nothing of availability: always the first k clients it is offered."""

    def select(self, population, k, round, seed):
        return np.arange(k)


def test_a_selector_without_availability_chooses_among_the_checked_in_clients():
    a = Availability(np.arange(5), np.array([50.0, 0.0, 50.0, 0.0]), np.full(4, 60.0), np.full(4, 100.0))
    caps = capacity([0.01] * 4, [1e12] * 4, [1e12] * 4)
    loop, runtime = system_loop(SystemTraces(caps, a), [100] * 4, cohort=2, selector=FirstK())
    loop.run()
    assert runtime.trained == [[1, 3]]  # the first two of the clients online at t = 0


def test_a_round_where_everyone_drops_leaves_the_model_and_moves_the_clock():
    a = Availability(np.arange(3), np.zeros(2), np.array([0.5, 0.5]), np.full(2, 100.0))  # offline after 0.5 s
    loop, runtime = system_loop(SystemTraces(capacity([0.01] * 2, [1e12] * 2, [1e12] * 2), a), [100] * 2, cohort=2)
    record = loop.run()[0]
    assert runtime.trained == [[]]
    assert record.metrics["clients"] == 0 and record.metrics["dropped_offline"] == 2
    assert record.metrics["sim_round_s"] == pytest.approx(0.5)
    assert loop.global_params.tensors()["w"].tolist() == [0.0, 0.0]


def test_selector_feedback_has_only_what_the_server_saw():
    recorder = Recorder()
    loop, _ = system_loop(SystemTraces(FOUR), [100] * 4, Deadline(6.0), selector=recorder)
    loop.run()
    (rnd, fb), *_ = recorder.seen
    assert rnd == 0 and fb.clients.tolist() == [0, 1, 2, 3]
    assert fb.completed.tolist() == [True, True, True, False]
    assert fb.loss[:3].tolist() == [1.0, 2.0, 3.0] and np.isnan(fb.loss[3])
    assert fb.samples.tolist() == [100.0, 100.0, 100.0, 0.0]
    assert fb.duration.tolist() == pytest.approx([1.0, 5.0, 3.0, 6.0])  # the straggler: at least the deadline


def test_time_to_target_is_reported_once_in_simulated_and_wall_seconds():
    loop, _ = system_loop(SystemTraces(FOUR), [100] * 4, cohort=4, rounds=3, target=3.0, target_metric="test_sum")
    history = loop.run()
    # every round folds the weighted mean delta 1.5 into both coordinates: sums 3, 6, 9
    assert [("sim_time_to_target_s" in r.metrics) for r in history] == [True, False, False]
    assert loop.time_to_target["sim_time_s"] == pytest.approx(8.0)
    assert loop.time_to_target["round"] == 0.0


def test_snapshot_restore_keeps_sim_time_and_target():
    loop, _ = system_loop(SystemTraces(FOUR), [100] * 4, rounds=2, target=3.0, target_metric="test_sum")
    loop.run()
    fresh, _ = system_loop(SystemTraces(FOUR), [100] * 4, rounds=2, target=3.0, target_metric="test_sum")
    fresh.restore(loop.snapshot())
    assert fresh.clock.now == pytest.approx(16.0)
    assert fresh.time_to_target == loop.time_to_target
    assert fresh.wall_time == pytest.approx(loop.wall_time)


def test_loop_checks_its_system_inputs():
    with pytest.raises(ValueError, match="traces cover 4 clients but the runtime has 3"):
        system_loop(SystemTraces(FOUR), [100] * 3, cohort=2)
    runtime = SizedRuntime([1, 2])
    params = FlatParams.from_tensors({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="needs client_sizes"):
        RoundLoop(
            build_strategy("fedavg"), runtime, UniformSelector(), params, FitConfig(),
            LoopConfig(rounds=1, cohort=1), round_end=WaitForAll(),
        )  # fmt: skip


def test_without_system_inputs_the_loop_behaves_as_before():
    runtime = SizedRuntime([10, 20, 30])
    params = FlatParams.from_tensors({"w": torch.zeros(2)})
    loop = RoundLoop(
        build_strategy("fedavg"),
        runtime,
        UniformSelector(),
        params,
        FitConfig(epochs=1),
        LoopConfig(rounds=1, cohort=3),
    )
    m = loop.run()[0].metrics
    assert runtime.trained == [[0, 1, 2]] and "selected" not in m and "online" not in m
    expected = max(DeviceProfile().latency(s, 8, 8) for s in (10, 20, 30))
    assert m["sim_round_s"] == pytest.approx(expected)
    assert dataclasses.asdict(loop.history[0])["metrics"]["sim_time_s"] == pytest.approx(expected)
