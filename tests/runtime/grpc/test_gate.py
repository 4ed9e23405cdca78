"""The round gate: what the arbiter refuses before it buffers a single byte, and why."""

import torch

from fedfleet.core.params import FlatParams
from fedfleet.runtime.grpc.gate import RoundGate, check_values
from fedfleet.runtime.grpc.wire import Result

PARAMS = FlatParams.from_tensors({"w": torch.zeros(3)})


def result(**kw):
    base = dict(
        task_id="t-a", round=4, weight=10.0, has_params=True, spec_digest=PARAMS.spec.digest, sizes={"float32": 3}
    )
    return Result(**{**base, **kw})


def open_gate():
    gate = RoundGate(PARAMS.spec, max_weight=1000)
    gate.open(4, {"a": "t-a", "b": "t-b"})
    return gate


def test_a_good_result_is_admitted_once():
    gate = open_gate()
    assert gate.admit("a", result()) is None
    assert gate.admit("a", result()).startswith("duplicate")
    assert gate.rejected == {"duplicate": 1}


def test_refusals_name_their_reason():
    cases = {
        "stale": result(round=3),
        "replay": result(task_id="t-old"),
        "layout": result(sizes={"float32": 4}),
        "weight": result(weight=5000.0),
    }
    for kind, res in cases.items():
        gate = open_gate()
        assert gate.admit("a", res).startswith(kind)
    gate = open_gate()
    assert gate.admit("c", result(task_id="t-c")).startswith("unsolicited")
    assert gate.admit("b", result(task_id="t-b", weight=float("nan"))).startswith("weight")
    assert gate.admit("a", result(spec_digest="0" * 16)).startswith("layout")
    assert gate.admit("a", result(has_params=False)).startswith("layout")


def test_results_after_the_round_closed_are_late():
    gate = open_gate()
    gate.close()
    assert gate.admit("a", result()).startswith("late")


def test_values_must_be_finite():
    assert check_values(PARAMS) is None
    bad = FlatParams.from_tensors({"w": torch.tensor([0.0, float("nan"), 1.0])})
    assert check_values(bad).startswith("values")


def test_typed_stats_and_shown_metrics_from_a_party_are_checked_before_folding():
    """A party's stats steer the clock, Oort and q-FedAvg, and its metrics are averaged: garbage is refused
    with a reason, never raised inside the arbiter's loop."""
    bad_stats = [
        {"samples": -5.0},
        {"loss": float("nan")},
        {"loss_sq": float("inf")},
        {"initial_loss": "high"},
        {"weight_for_me": 1e9},
        [1, 2],
    ]
    for stats in bad_stats:
        gate = open_gate()
        assert gate.admit("a", result(stats=stats)).startswith("stats"), stats
    bad_metrics = [{"loss": "low"}, {"loss": float("inf")}, {"x" * 200: 1.0}, {f"m{i}": 1.0 for i in range(100)}, [1]]
    for metrics in bad_metrics:
        gate = open_gate()
        assert gate.admit("a", result(metrics=metrics)).startswith("metrics"), metrics
    gate = open_gate()
    good = result(stats={"samples": 40.0, "loss": -0.5, "loss_sq": 0.3}, metrics={"auc": float("nan")})
    assert gate.admit("a", good) is None  # a log-likelihood may be negative, AUC undefined on one class


def test_finite_values_that_would_overflow_the_sum_are_refused():
    """3e38 is a finite float32, but twice it is inf: the fold would kill the round (FloatingPointError)."""
    huge = FlatParams.from_tensors({"w": torch.tensor([1.0, 3e38, -2.0])})
    assert check_values(huge, weight=2.0).startswith("values: values up to 3e+38 with weight 2 would overflow")
    assert check_values(FlatParams.from_tensors({"w": torch.tensor([1e20, 0.0])}), weight=1e6) is None
    assert check_values(FlatParams.from_tensors({"w": torch.tensor([1.0, float("inf")])})).startswith("values: NaN")


def test_an_answer_of_another_kind_than_the_task_is_refused_and_counted():
    """An evaluation sent for a fit task used to drop the party silently; params on an evaluate answer were
    buffered and never given back, so every later round blocked on the pool."""
    gate = open_gate()  # a fit round
    assert gate.admit("a", result(task="evaluate", has_params=False)).startswith("task: a evaluate result for a fit")
    gate = RoundGate(PARAMS.spec, max_weight=1000)
    gate.open(4, {"a": "t-a"}, "evaluate")
    assert gate.admit("a", result(task="evaluate")).startswith("task: an evaluate result carries metrics only")
    assert gate.admit("a", result(task="evaluate", has_params=False, sizes={})) is None
    assert gate.rejected == {"task": 1}


def test_a_flood_of_bad_messages_is_counted_but_logged_at_most_a_fixed_number_of_times(caplog):
    from fedfleet.runtime.grpc.arbiter import WARNINGS_PER_PARTY, ArbiterServer

    server = ArbiterServer(session="s", parties=["a"], spec=PARAMS.spec, address="127.0.0.1:0", credentials=None)
    with caplog.at_level("WARNING", logger="fedfleet.arbiter"):
        for _ in range(1000):
            server._warn("a", "bad message from %s", "a")
    assert len(caplog.records) == WARNINGS_PER_PARTY + 1  # and one line saying the rest are not logged
    assert "not logged" in caplog.records[-1].getMessage()


def test_metric_names_a_party_invents_every_round_stop_widening_the_table():
    """60k new keys a round once stalled the arbiter (a per-key list search) and gave 200k-column rows."""
    from fedfleet.runtime.grpc.runtime import MAX_METRIC_NAMES, GrpcRuntime

    runtime = GrpcRuntime.__new__(GrpcRuntime)
    runtime._metric_names, runtime._dropped_names = set(), 0
    for rnd in range(10):
        shown = runtime._shown({"loss": 1.0, **{f"junk{rnd}_{i}": 0.0 for i in range(60)}})
        assert shown["loss"] == 1.0  # names already shown always pass
    assert len(runtime._metric_names) == MAX_METRIC_NAMES and runtime._dropped_names == 61 + 9 * 60 - MAX_METRIC_NAMES


def test_the_metrics_file_adds_a_column_in_constant_time(tmp_path):
    import time

    from fedfleet.callbacks.metrics_file import MetricsFileCallback
    from fedfleet.core.loop import RoundRecord

    cb = MetricsFileCallback(tmp_path)
    cb._rows, started = [], time.monotonic()
    for rnd in range(4):  # new keys every round: a list of columns made each one a search of all before it
        cb._add_columns({f"k{rnd}_{i}": 0.0 for i in range(15_000)})
    cb.on_round_end(None, RoundRecord(0, {"loss": 1.0}))
    assert time.monotonic() - started < 5  # the list search: ~1e9 string comparisons, tens of seconds
    assert "k3_14999" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
