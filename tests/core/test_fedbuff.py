"""FedBuff on the virtual clock: hand-checked arrival order, staleness and weights; buffers; offline clients;
determinism; the synchronous reference; resume with clients in flight; bad configs."""

import math
import os
import signal

import numpy as np
import pytest
import torch

from fedfleet.callbacks import CheckpointCallback, resume
from fedfleet.config.loader import parse
from fedfleet.config.schema import JobConfig
from fedfleet.core.async_loop import AsyncLoop, FedBuff
from fedfleet.core.async_staleness import Constant, Hinge, Polynomial, arrival_factor
from fedfleet.core.clock import DeviceProfile, VirtualClock
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy
from fedfleet.traces import Availability, DeviceCapacity, SystemTraces


class DeltaRuntime:
    """Client c sends the delta [c + 1] with weight = its size; records whom it trained, at which version."""

    def __init__(self, sizes) -> None:
        self.sizes = np.asarray(sizes)
        self.population = len(sizes)
        self.trained: list[tuple[list[int], int]] = []

    def fit(self, global_params, clients, config):
        self.trained.append(([int(c) for c in clients], config.round))
        for c in clients:
            delta = FlatParams.from_tensors({"w": torch.full((1,), float(c + 1))})
            yield Update(delta, weight=float(self.sizes[c]), metrics={"train_loss": float(c)}, client_id=int(c))

    def round_metrics(self):
        return {}

    def evaluate(self, global_params):
        return {"w": float(global_params.buffers[torch.float32][0])}


class Recorder(UniformSelector):
    def __init__(self):
        object.__setattr__(self, "seen", [])

    def observe(self, round, feedback):
        self.seen.append((round, feedback))


def async_loop(seconds_per_sample, fedbuff, rounds, traces=None, sizes=None, selector=None, strategy="fedavg"):
    """Clients with 10 examples (1 epoch) at the given seconds per sample on free links: latency = 10 x s."""
    n = len(seconds_per_sample)
    sizes = np.full(n, 10) if sizes is None else np.asarray(sizes)
    if traces is None:
        profiles = [DeviceProfile(s, math.inf, math.inf) for s in seconds_per_sample]
        clock = VirtualClock(profile_of=lambda c: profiles[int(c)])
    else:
        clock = VirtualClock(traces=traces)
    runtime = DeltaRuntime(sizes)
    loop = AsyncLoop(
        build_strategy(strategy),
        runtime,
        selector or UniformSelector(),
        FlatParams.from_tensors({"w": torch.zeros(1)}),
        FitConfig(epochs=1, lr=1.0),
        LoopConfig(rounds=rounds, cohort=fedbuff.concurrency, seed=0),
        fedbuff,
        sizes,
        clock=clock,
    )
    return loop, runtime


def test_staleness_functions_and_the_arrival_factor():
    assert Polynomial()(0) == 1.0 and Polynomial()(3) == 0.5  # 1 / sqrt(1 + 3)
    assert Polynomial(exponent=1.0)(4) == pytest.approx(0.2)
    assert Constant()(100) == 1.0
    assert Hinge(a=10, b=4)(4) == 1.0 and Hinge(a=10, b=4)(5) == pytest.approx(1 / 11)
    assert arrival_factor(Polynomial(), 3, 20.0, by_examples=True) == (10.0, 20.0)  # scale 20 x 0.5, weight 20
    assert arrival_factor(Polynomial(), 3, 20.0, by_examples=False) == (0.5, 1.0)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        arrival_factor(Constant(), -1, 1.0, True)


def test_three_clients_hand_checked_arrival_order_staleness_and_weights():
    # latencies 1, 2.5 and 4 s; all three train at once; every arrival is a server step (buffer 1)
    loop, runtime = async_loop([0.1, 0.25, 0.4], FedBuff(buffer=1, concurrency=3), rounds=6)
    history = loop.run()
    # t=1 c0 (from v0) -> v1; c0 again from v1 arrives t=2 -> v2; c1 (v0) t=2.5 is 2 steps stale -> v3;
    # c0 (v2) t=3 -> v4; at t=4 c2 (v0, dispatched first) then c0 (v4): staleness 4, then 1
    assert [r.metrics["sim_time_s"] for r in history] == pytest.approx([1.0, 2.0, 2.5, 3.0, 4.0, 4.0])
    assert [r.metrics["staleness_max"] for r in history] == [0, 0, 2, 1, 4, 1]
    assert [r.metrics["train_loss"] for r in history] == [0, 0, 1, 0, 2, 0]  # which client arrived
    assert runtime.trained == [([0, 1, 2], 0), ([0], 1), ([0], 2), ([1], 3), ([0], 4)]
    # buffer 1 and FedAvg: each step adds factor x delta; client c's delta is c + 1
    expected = 1 + 1 + 2 / math.sqrt(3) + 1 / math.sqrt(2) + 3 / math.sqrt(5) + 1 / math.sqrt(2)
    assert loop.global_params.tensors()["w"].item() == pytest.approx(expected, rel=1e-6)
    assert history[-1].metrics["test_w"] == pytest.approx(expected, rel=1e-6)
    assert [r.metrics["in_flight"] for r in history] == [2, 2, 2, 2, 2, 1]


def test_arrivals_staler_than_max_staleness_are_discarded():
    loop, _ = async_loop([0.1, 0.25, 0.4], FedBuff(buffer=1, concurrency=3, max_staleness=3), rounds=5)
    history = loop.run()
    # as above, but at t=4 client 2 is 4 steps stale: discarded, and client 0 (fresh) makes step 5
    assert [r.metrics["staleness_max"] for r in history] == [0, 0, 2, 1, 0]
    assert [r.metrics["dropped_stale"] for r in history] == [0, 0, 0, 0, 1]
    expected = 1 + 1 + 2 / math.sqrt(3) + 1 / math.sqrt(2) + 1
    assert loop.global_params.tensors()["w"].item() == pytest.approx(expected, rel=1e-6)


def test_a_buffer_of_b_makes_a_server_step_every_b_arrivals():
    speeds = [0.1, 0.13, 0.17, 0.23, 0.29, 0.31, 0.37, 0.41]
    loop, runtime = async_loop(speeds, FedBuff(buffer=3, concurrency=4, staleness=Constant()), rounds=5)
    history = loop.run()
    assert [r.metrics["clients"] for r in history] == [3] * 5
    times = [r.metrics["sim_time_s"] for r in history]
    assert times == sorted(times) and times[0] > 0
    dispatched = sum(len(clients) for clients, _ in runtime.trained)
    assert dispatched == sum(r.metrics["dispatched"] for r in history)
    assert dispatched == 15 + history[-1].metrics["in_flight"]  # every dispatched client arrived or is in flight
    # constant staleness and equal sizes: each step adds the plain mean of its three deltas (values 1..8)
    w = loop.global_params.tensors()["w"].item()
    assert 5 * 1.0 <= w <= 5 * 8.0 and w * 3 == pytest.approx(round(w * 3), abs=1e-4)


def test_an_offline_client_delivers_nothing_and_is_never_trained():
    # client 1 needs 5 s but leaves at t = 2; clients 0 and 2 take 1 s and stay online
    caps = DeviceCapacity(np.array([0.1, 0.5, 0.1]), np.full(3, 1e15), np.full(3, 1e15))
    online = Availability(np.arange(4), np.zeros(3), np.array([100.0, 2.0, 100.0]), np.full(3, 100.0))
    recorder = Recorder()
    loop, runtime = async_loop(
        [0.1, 0.5, 0.1], FedBuff(buffer=1, concurrency=3), 3, SystemTraces(caps, online), selector=recorder
    )
    history = loop.run()
    assert all(1 not in clients for clients, _ in runtime.trained)
    assert [r.metrics["dropped_offline"] for r in history] == [0, 0, 1]
    # c0 (s 0) + c2 (one step stale, 3 / sqrt 2) + c0 again (s 0): never client 1's delta of 2
    assert loop.global_params.tensors()["w"].item() == pytest.approx(2 + 3 / math.sqrt(2), rel=1e-6)
    last_round, fb = recorder.seen[-1]
    assert last_round == 2 and fb.clients.tolist() == [1, 0]
    assert fb.completed.tolist() == [False, True] and np.isnan(fb.duration[0]) and fb.duration[1] == pytest.approx(1.0)


def test_resume_with_clients_in_flight_gives_the_same_model(tmp_path):
    speeds = [0.1, 0.13, 0.17, 0.23, 0.29, 0.31]
    fedbuff = FedBuff(buffer=2, concurrency=4)
    full, _ = async_loop(speeds, fedbuff, rounds=6, strategy="fedyogi")
    full.run()
    first, _ = async_loop(speeds, fedbuff, rounds=6, strategy="fedyogi")
    first.callbacks.append(CheckpointCallback(tmp_path, every=3))
    first.config.rounds = 3
    first.run()
    assert len(first.in_flight) >= 2  # the checkpoint holds clients in flight, with their deltas
    resumed, _ = async_loop(speeds, fedbuff, rounds=6, strategy="fedyogi")
    assert resume(resumed, tmp_path) and resumed.round == 3 and len(resumed.in_flight) == len(first.in_flight)
    resumed.run()
    assert resumed.global_params.allclose(full.global_params, rtol=0, atol=0)
    assert [r.metrics["sim_time_s"] for r in resumed.history] == [r.metrics["sim_time_s"] for r in full.history]


class Trip(DeltaRuntime):
    """Calls ``act`` when asked to train for the ``at``-th time (a Ctrl-C, a crash)."""

    def __init__(self, sizes, at, act):
        super().__init__(sizes)
        self.at, self.act = at, act

    def fit(self, global_params, clients, config):
        if len(self.trained) == self.at:
            self.act()
        yield from super().fit(global_params, clients, config)


def test_ctrl_c_finishes_the_server_step_and_the_checkpoint_resumes_exactly(tmp_path):
    speeds = [0.1, 0.13, 0.17, 0.23, 0.29, 0.31]
    fedbuff = FedBuff(buffer=2, concurrency=4)
    full, _ = async_loop(speeds, fedbuff, rounds=6)
    full.run()
    hit, _ = async_loop(speeds, fedbuff, rounds=6)
    hit.runtime = Trip(hit.runtime.sizes, 2, lambda: os.kill(os.getpid(), signal.SIGINT))  # inside step 2
    hit.callbacks.append(CheckpointCallback(tmp_path, every=100))
    with pytest.raises(KeyboardInterrupt):
        hit.run()
    assert hit.round == 2  # the step under way when Ctrl-C came was finished and committed
    resumed, _ = async_loop(speeds, fedbuff, rounds=6)
    assert resume(resumed, tmp_path) and resumed.round == 2 and len(resumed.in_flight) > 0
    resumed.run()
    assert resumed.global_params.allclose(full.global_params, rtol=0, atol=0)


def test_a_run_that_fails_inside_a_step_checkpoints_its_last_commit_without_clients_in_flight(tmp_path):
    speeds = [0.1, 0.13, 0.17, 0.23, 0.29, 0.31]
    loop, _ = async_loop(speeds, FedBuff(buffer=2, concurrency=4), rounds=6)

    def crash():
        raise RuntimeError("a client's data is unreadable")

    loop.runtime = Trip(loop.runtime.sizes, 3, crash)
    loop.callbacks.append(CheckpointCallback(tmp_path, every=100))
    with pytest.raises(RuntimeError, match="unreadable"):
        loop.run()
    committed = loop.history[-1].metrics["sim_time_s"]
    assert loop.clock.now > committed  # the failed step had moved on
    resumed, runtime = async_loop(speeds, FedBuff(buffer=2, concurrency=4), rounds=6)
    assert resume(resumed, tmp_path) and resumed.round == loop.round
    assert len(resumed.in_flight) == 0 and resumed.clock.now == committed
    assert resumed.global_params.allclose(loop.global_params, rtol=0, atol=0)
    resumed.run()
    clients, version = runtime.trained[0]
    assert resumed.round == 6 and len(clients) == 4 and version == loop.round  # four dispatched afresh


def test_refused_inputs_name_the_cause():
    with pytest.raises(ValueError, match="buffer must be >= 1"):
        FedBuff(buffer=0)
    with pytest.raises(ValueError, match="concurrency 5 is larger than the population of 3"):
        async_loop([0.1] * 3, FedBuff(buffer=1, concurrency=5), rounds=1)
    with pytest.raises(ValueError, match="QFedAvg aggregates its own way"):
        async_loop([0.1] * 3, FedBuff(buffer=1, concurrency=2), rounds=1, strategy="qfedavg")


# -- whole jobs on the digits data -------------------------------------------------------------------
def digits_job(tmp_path, fedbuff, **overrides) -> JobConfig:
    data = {
        "name": "fedbuff",
        "rounds": 3,
        "cohort": 4,
        "eval_every": 3,
        "data": {"dataset": "digits", "clients": 20, "partition": "iid"},
        "client": {"steps": 3, "batch_size": 10, "lr": 0.1},
        "runtime": {"vectorize": "off"},
        "output": {"dir": str(tmp_path)},
        "fedbuff": fedbuff,
        **overrides,
    }
    return parse(JobConfig, data)


@pytest.mark.parametrize("strategy", ["fedavg", {"name": "fedyogi", "server_lr": 0.05}])
def test_fedbuff_with_buffer_equal_to_the_cohort_on_equal_clients_is_synchronous_fedavg(tmp_path, strategy):
    # 3 steps of 10 samples each: every client has the same latency on the default device
    sync = Simulation.from_config(digits_job(tmp_path, None, strategy=strategy))
    fedbuff = {"buffer": 4, "concurrency": 4, "staleness": "constant"}
    asyn = Simulation.from_config(digits_job(tmp_path, fedbuff, strategy=strategy))
    a, b = sync.run(), asyn.run()
    assert asyn.loop.global_params.allclose(sync.loop.global_params, rtol=0, atol=0)
    assert [r.metrics["sim_time_s"] for r in b] == pytest.approx([r.metrics["sim_time_s"] for r in a])
    assert b[-1].metrics["test_accuracy"] == a[-1].metrics["test_accuracy"]
    assert all(r.metrics["staleness_max"] == 0 for r in b)


def test_same_seed_same_model_with_generated_traces(tmp_path):
    system = {"traces": {"name": "generate", "online_fraction": 0.6}}
    fedbuff = {"buffer": 2, "concurrency": 5}

    def final(seed):
        sim = Simulation.from_config(digits_job(tmp_path, fedbuff, system=system, seed=seed, rounds=4))
        history = sim.run()
        return sim.loop.global_params, history

    (a, ha), (b, hb), (c, _) = final(0), final(0), final(1)
    assert a.allclose(b, rtol=0, atol=0) and not a.allclose(c)
    assert [r.metrics["sim_time_s"] for r in ha] == [r.metrics["sim_time_s"] for r in hb]
    assert any(r.metrics["staleness_max"] > 0 for r in ha)  # slow and fast devices: some arrivals are stale
    assert all(r.metrics["clients"] == 2 for r in ha)


def test_bad_fedbuff_config_fails_before_any_work(tmp_path):
    cases = [
        ({"buffer": 0}, {}, r"fedbuff.buffer must be > 0"),
        ({"bufer": 3}, {}, r"fedbuff.bufer: unknown key \(did you mean 'buffer'\?\)"),
        ({"staleness": "sqr"}, {}, r"unknown staleness function 'sqr'"),
        ({"staleness": {"name": "polynomial", "exponent": -1}}, {}, r"exponent must be a finite number >= 0"),
        ({"concurrency": 30}, {}, r"fedbuff.concurrency 30 is larger than the 20 clients"),
        ({}, {"system": {"round_end": "overcommit"}}, r"remove system.round_end"),
        ({}, {"strategy": "qfedavg"}, r"fedbuff: .*QFedAvg aggregates its own way"),
        ({}, {"runtime": {"kind": "ray"}}, r"runtime.kind 'ray' is not supported with it yet"),
    ]
    for fedbuff, overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            Simulation.from_config(digits_job(tmp_path, fedbuff, **overrides))


def test_progress_rows_are_server_steps():
    from io import StringIO

    from rich.console import Console

    from fedfleet.callbacks import ProgressCallback

    buf = StringIO()
    loop, _ = async_loop([0.1, 0.2, 0.3], FedBuff(buffer=1, concurrency=2), rounds=2)
    loop.callbacks.append(ProgressCallback(Console(file=buf, width=100), columns=("clients",)))
    loop.run()
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["step", "clients"] and [line.split()[0] for line in lines[1:]] == ["1", "2"]
