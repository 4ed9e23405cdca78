"""System traces: columnar capacity and availability, the seeded generator, FedScale's pickles, bad input."""

import pickle

import numpy as np
import pytest

from fedfleet.errors import ConfigError
from fedfleet.traces import (
    Availability,
    DeviceCapacity,
    TraceError,
    build_traces,
    generate_traces,
    load_fedscale_availability,
    load_fedscale_capacity,
)


def avail(intervals: list[list[tuple[float, float]]], period: float = 40.0) -> Availability:
    offsets = np.cumsum([0] + [len(c) for c in intervals])
    starts = np.array([s for c in intervals for s, _ in c], dtype=float)
    ends = np.array([e for c in intervals for _, e in c], dtype=float)
    return Availability(offsets, starts, ends, np.full(len(intervals), period))


# -- availability semantics ------------------------------------------------------------------------
def test_online_at_uses_closed_intervals_and_repeats_every_period():
    a = avail([[(0, 10), (20, 30)], [], [(0, 40)]]).check("test")
    assert a.online_at(5).tolist() == [True, False, True]
    assert a.online_at(10).tolist() == [True, False, True]  # closed: the end is still online
    assert a.online_at(15).tolist() == [False, False, True]
    assert a.online_at(45).tolist() == [True, False, True]  # 45 mod 40 = 5
    assert a.online_clients(25).tolist() == [0, 2]


def test_time_left_counts_a_session_that_wraps_over_the_period_end():
    a = avail([[(0, 10), (20, 30)], [(0, 5), (30, 40)], [(0, 40)]])
    assert a.time_left(np.array([0]), 5.0).tolist() == [5.0]
    assert a.time_left(np.array([0]), 15.0).tolist() == [0.0]  # offline now
    assert a.time_left(np.array([1]), 35.0).tolist() == [10.0]  # 5 s to the period end + 5 s after it
    assert a.time_left(np.array([2]), 7.0).tolist() == [np.inf]  # always online


def test_next_check_in_waits_for_the_first_client():
    a = avail([[(10, 20)], [(25, 30)]])
    assert a.next_check_in(12.0) == 12.0
    assert a.next_check_in(21.0) == 25.0
    assert a.next_check_in(31.0) == 50.0  # client 0 again in the next period


# -- the generator ---------------------------------------------------------------------------------
def test_generator_is_seeded_valid_and_hits_the_online_fraction():
    a = generate_traces(20_000, seed=3, online_fraction=0.3)
    b = generate_traces(20_000, seed=3, online_fraction=0.3)
    c = generate_traces(20_000, seed=4, online_fraction=0.3)
    assert np.array_equal(a.capacity.seconds_per_sample, b.capacity.seconds_per_sample)
    assert np.array_equal(a.availability.starts, b.availability.starts)
    assert not np.array_equal(a.capacity.seconds_per_sample, c.capacity.seconds_per_sample)
    a.availability.check("generated")
    a.capacity.check("generated")
    assert a.availability.online_fraction() == pytest.approx(0.3, abs=0.01)
    by_hour = [a.availability.online_at(h * 3600.0).mean() for h in range(24)]
    assert np.mean(by_hour) == pytest.approx(0.3, abs=0.02)
    assert max(by_hour) - min(by_hour) > 0.1  # diurnal: more clients online at night


def test_generated_capacity_is_heavy_tailed_around_the_medians():
    cap = generate_traces(50_000, seed=0, availability=False, compute_median_s=0.01).capacity
    assert np.median(cap.seconds_per_sample) == pytest.approx(0.01, rel=0.03)
    assert np.median(cap.download_bytes_per_s) == pytest.approx(2.5e6, rel=0.05)
    p50, p95 = np.percentile(cap.download_bytes_per_s, [50, 95])
    assert p95 / p50 > 4  # lognormal bandwidth: a long tail of fast links


def test_a_million_clients_cost_well_under_2gb():
    t = generate_traces(100_000, seed=0)
    assert t.nbytes * 10 < 200 * 2**20  # ~90 MB for 1,000,000 clients (benchmarks/oort_scale.py measures RSS)


def test_everyone_online_and_bad_generator_parameters():
    t = generate_traces(10, seed=0, online_fraction=1.0)
    assert t.availability.online_at(123.0).all()
    assert t.availability.time_left(np.array([3]), 5.0).tolist() == [np.inf]
    with pytest.raises(TraceError, match="online_fraction"):
        generate_traces(10, seed=0, online_fraction=0.0)
    with pytest.raises(TraceError, match="compute_median_s"):
        generate_traces(10, seed=0, compute_median_s=-1)
    with pytest.raises(ConfigError, match=r"onlin_fraction.*did you mean 'online_fraction'"):
        build_traces("generate", 10, 0, onlin_fraction=0.5)


# -- FedScale's pickles ----------------------------------------------------------------------------
def fedscale_is_active(trace: dict, t: float) -> bool:
    """FedScale's availability rule, written out: online iff active[j] <= t mod finish_time <= inactive[j]."""
    x = t % trace["finish_time"]
    return any(a <= x <= b for a, b in zip(trace["active"], trace["inactive"], strict=True))


def write(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return path


CAPACITY = {1: {"computation": 10.0, "communication": 800.0}, 2: {"computation": 40.0, "communication": 8000.0}}
BEHAVIOUR = {
    1: {"duration": 20, "inactive": [20, 60], "finish_time": 100, "active": [10, 50]},
    2: {"duration": 100, "inactive": [100], "finish_time": 100, "active": [0]},
    3: {"duration": 30, "inactive": [45, 90], "finish_time": 120, "active": [30, 75]},
}


def test_fedscale_capacity_units(tmp_path):
    cap = load_fedscale_capacity(write(tmp_path / "cap", CAPACITY), 5)
    # ms of inference per sample x 3 (forward + backward) / 1000; kbit/s of 1024 bits / 8 bytes
    assert cap.seconds_per_sample.tolist() == pytest.approx([0.03, 0.12, 0.03, 0.12, 0.03])
    assert cap.download_bytes_per_s.tolist() == [102_400.0, 1_024_000.0] * 2 + [102_400.0]
    assert np.array_equal(cap.upload_bytes_per_s, cap.download_bytes_per_s)
    # a 1 MB model up and down over 800 kbps with 10 steps of 20 samples: FedScale's getCompletionTime
    size_kbit = 1e6 / 1024 * 8
    fedscale = 3 * 20 * 10 * 10.0 / 1000 + 2 * size_kbit / 800.0
    assert cap.latency(np.array([0]), 200, 1e6, 1e6)[0] == pytest.approx(fedscale)


def test_fedscale_availability_round_trip(tmp_path):
    a = load_fedscale_availability(write(tmp_path / "behave", BEHAVIOUR), 6)
    traces = [BEHAVIOUR[k] for k in (1, 2, 3, 1, 2, 3)]  # assign: cycle
    for t in np.linspace(0, 400, 161):
        assert a.online_at(t).tolist() == [fedscale_is_active(tr, t) for tr in traces], t


def test_fedscale_exact_assignment_names_the_missing_client(tmp_path):
    path = write(tmp_path / "cap", CAPACITY)
    assert len(load_fedscale_capacity(path, 2, assign="exact")) == 2
    with pytest.raises(TraceError, match=r"client 2 \(FedScale id 3\) is missing.*assign: cycle"):
        load_fedscale_capacity(path, 3, assign="exact")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({1: {"computation": -5.0, "communication": 800.0}}, r"client 1 has 'computation' = -5.0"),
        ({7: {"computation": 5.0, "communication": 0.0}}, r"client 7 has 'communication' = 0.0"),
        ({1: {"computation": 5.0}}, r"client 1 has no numeric 'communication' \(kbps\)"),
        ([1, 2], "must hold a non-empty dict"),
    ],
)
def test_bad_capacity_files(tmp_path, table, message):
    path = write(tmp_path / "client_device_capacity", table)
    with pytest.raises(TraceError, match=message) as err:
        load_fedscale_capacity(path, 4)
    assert "client_device_capacity" in str(err.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"active": [50, 10], "inactive": [60, 20], "finish_time": 100}, "client 4 has unsorted intervals"),
        ({"active": [10, 15], "inactive": [20, 30], "finish_time": 100}, "client 4 has overlapping intervals"),
        ({"active": [10], "inactive": [5], "finish_time": 100}, "ends before it starts"),
        ({"active": [10], "inactive": [150], "finish_time": 100}, "ending after its trace period"),
        ({"active": [10, 20], "inactive": [15], "finish_time": 100}, "2 'active' times but 1 'inactive'"),
        ({"active": [1], "inactive": [2]}, "not a FedScale behaviour trace"),
    ],
)
def test_bad_behaviour_files(tmp_path, entry, message):
    path = write(tmp_path / "client_behave_trace", {**BEHAVIOUR, 4: entry})
    with pytest.raises(TraceError, match=message) as err:
        load_fedscale_availability(path, 4)
    assert "client_behave_trace" in str(err.value)


def test_a_population_never_online_is_refused(tmp_path):
    never = {
        1: {"active": [], "inactive": [], "finish_time": 100},
        2: {"active": [5], "inactive": [5], "finish_time": 9},
    }
    with pytest.raises(TraceError, match="no client is ever online"):
        load_fedscale_availability(write(tmp_path / "behave", never), 10)


def test_missing_trace_file_names_it():
    with pytest.raises(TraceError, match="device_conf_file 'nowhere/cap' does not exist"):
        build_traces("fedscale", 10, 0, device_conf_file="nowhere/cap")


def test_negative_generated_speed_is_caught_by_check():
    cap = DeviceCapacity(np.array([0.1, -0.2]), np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    with pytest.raises(TraceError, match=r"mine: client 1 has seconds per sample = -0\.2"):
        cap.check("mine")


class RunsCode:
    """What a hostile trace file does: unpickling it calls os.system (here, touching a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_trace_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "cap", {1: {"computation": 10.0, "communication": RunsCode(marker)}})
    with pytest.raises(TraceError, match=r"was refused: it names posix\.system, which is not plain data"):
        load_fedscale_capacity(path, 2)
    assert not marker.exists()
    class_instance = write(tmp_path / "cls", {1: dataclass_like()})
    with pytest.raises(TraceError, match="not plain data"):
        load_fedscale_capacity(class_instance, 2)


def dataclass_like():
    from fedfleet.traces.capacity import DeviceCapacity

    return DeviceCapacity.__new__(DeviceCapacity)


def test_numpy_scalars_in_a_trace_pickle_still_load(tmp_path):
    """FedScale's files may carry NumPy numbers: they rebuild plain data and are admitted."""
    table = {1: {"computation": np.float64(10.0), "communication": np.int64(800)}}
    cap = load_fedscale_capacity(write(tmp_path / "np", table), 1)
    assert cap.seconds_per_sample.tolist() == pytest.approx([0.03])
