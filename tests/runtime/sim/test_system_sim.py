"""End to end on the digits data: simulated devices and availability, Oort, round-end policies, the CLI line."""

import itertools
import pickle

import numpy as np
import pytest

from fedfleet.config.loader import parse
from fedfleet.config.schema import JobConfig
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.traces import TraceError


def job(tmp_path, system, **overrides) -> JobConfig:
    data = {
        "name": "system",
        "rounds": 3,
        "cohort": 4,
        "eval_every": 3,
        "data": {"dataset": "digits", "clients": 40},
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        "runtime": {"vectorize": "off"},
        "output": {"dir": str(tmp_path)},
        "system": system,
        **overrides,
    }
    return parse(JobConfig, data)


def test_generated_traces_with_oort_and_overcommitment(tmp_path):
    system = {"traces": {"name": "generate", "online_fraction": 0.5}, "round_end": {"name": "overcommit"}}
    sim = Simulation.from_config(job(tmp_path, system, selector="oort"))
    history = sim.run()
    times = [r.metrics["sim_time_s"] for r in history]
    assert all(b > a for a, b in itertools.pairwise(times))
    for r in history:
        m = r.metrics
        assert m["selected"] == min(5, m["online"])  # floor(4 x 1.3) asked, of those checked in
        assert m["clients"] == min(4, m["selected"] - m["dropped_offline"])
        assert m["sim_round_s"] > 0 and m["wall_time_s"] > 0
    assert "test_accuracy" in history[-1].metrics
    oort = sim.loop.selector
    assert np.isfinite(oort._reward).sum() >= 4  # Oort learned from what the clients reported


def test_fedscale_traces_with_a_deadline(tmp_path):
    capacity = {i: {"computation": 5.0 * i, "communication": 2000.0} for i in range(1, 11)}
    behaviour = {
        i: {"duration": 50, "active": [0.0], "inactive": [40.0 + 10 * i], "finish_time": 200} for i in range(1, 11)
    }
    (tmp_path / "cap").write_bytes(pickle.dumps(capacity))
    (tmp_path / "behave").write_bytes(pickle.dumps(behaviour))
    traces = {
        "name": "fedscale",
        "device_conf_file": str(tmp_path / "cap"),
        "device_avail_file": str(tmp_path / "behave"),
    }
    system = {"traces": traces, "round_end": {"name": "deadline", "seconds": 2.0}, "target_accuracy": 0.05}
    sim = Simulation.from_config(job(tmp_path, system, rounds=2, eval_every=1))
    history = sim.run()
    assert all(r.metrics["sim_round_s"] <= 2.0 for r in history)
    assert sim.loop.time_to_target is not None and sim.loop.time_to_target["round"] == 0.0
    assert history[0].metrics["sim_time_to_target_s"] == history[0].metrics["sim_time_s"]


def test_bad_system_config_fails_before_any_work(tmp_path):
    with pytest.raises(TraceError, match=r"device_conf_file 'missing\.pkl' does not exist"):
        Simulation.from_config(job(tmp_path, {"traces": {"name": "fedscale", "device_conf_file": "missing.pkl"}}))
    with pytest.raises(ConfigError, match="unknown round-end policy"):
        Simulation.from_config(job(tmp_path, {"round_end": "fastest"}))
    with pytest.raises(ConfigError, match=r"system.target_accuracy must be in \(0, 1\]"):
        job(tmp_path, {"target_accuracy": 80})


def test_oort_with_profiles_registers_every_client_before_round_one(tmp_path):
    system = {"traces": {"name": "generate", "online_fraction": 1.0}, "round_end": {"name": "overcommit"}}
    runs = {}
    for profiles in (False, True):
        selector = {"name": "oort", "profiles": profiles}
        sim = Simulation.from_config(job(tmp_path, system, selector=selector, rounds=1, cohort=8))
        sim.run()
        runs[profiles] = sim
    blind, told = runs[False].loop.selector, runs[True].loop.selector
    assert not blind._registered and told._registered
    sizes = runs[True].federation.sizes().numpy()
    assert np.array_equal(told._size, sizes)
    loop = runs[True].loop
    samples = sizes.astype(float)  # epochs: 1
    nbytes = loop.global_params.nbytes
    expected = loop.clock.latencies(np.arange(40), samples, nbytes, nbytes)
    never = np.isnan(told._reward)  # not selected: the duration is still the registered one
    assert np.allclose(told._duration[never], expected[never])
    # explorers drawn by profile are faster than blind ones: the round's slowest kept client finishes sooner
    assert runs[True].loop.history[0].metrics["sim_round_s"] < runs[False].loop.history[0].metrics["sim_round_s"]
