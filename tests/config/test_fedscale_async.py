"""FedScale's asynchronous FL (its FedBuff aggregator and async keys) as fedfleet's fedbuff section."""

from __future__ import annotations

import json

import pytest

from fedfleet.cli.main import main
from fedfleet.config import Named, load_job
from fedfleet.config import fedscale_keys as keys
from fedfleet.config.fedscale import FedScaleKeyWarning, from_fedscale
from fedfleet.config.schema import FedBuffConfig
from fedfleet.errors import ConfigError
from tests.fedscale_helpers import CLUSTER, DIGITS, conf, load, traces

# -- asynchronous FL: FedScale's FedBuff as fedfleet's fedbuff section -----------------------------
FEDBUFF_ENTRY = CLUSTER.replace("aggregation/aggregator.py", "aggregation/async_aggregator.py")


def test_async_mode_becomes_a_fedbuff_section_as_fedscales_fedbuff_weighs_arrivals(tmp_path):
    path = conf(
        tmp_path,
        *DIGITS,
        "async_mode: True",
        "async_buffer: 3",
        "max_concurrency: 6",
        "max_staleness: 2",
        "arrival_interval: 1",
        "checkin_period: 50",
        top="",
    )
    with pytest.warns(FedScaleKeyWarning) as caught:
        report = from_fedscale(path)
    # 1 / sqrt(1 + staleness), every client alike: FedScale's FedBuff aggregator
    assert report.job.fedbuff == FedBuffConfig(
        buffer=3, concurrency=6, staleness=Named("polynomial", {"exponent": 0.5}), weight_by_examples=False,
        max_staleness=2,
    )  # fmt: skip
    assert ("async_buffer: 3", "fedbuff.buffer: 3") in report.mapped
    assert ("max_concurrency: 6", "fedbuff.concurrency: 6") in report.mapped
    ignored = dict(report.ignored)
    assert "starts a client every arrival_interval seconds" in ignored["arrival_interval"]
    assert "read by neither of its async aggregators" in ignored["checkin_period"]
    # what differs is said, in the same warning as the keys that do not apply
    message = str(caught[0].message)
    assert "applied, but not exactly as FedScale applies them:\n  async_mode: FedScale divides" in message
    assert "fedfleet divides by the buffer size" in message and "arrival_interval" in message


def test_fedscales_async_aggregator_entry_switches_and_takes_its_defaults(tmp_path):
    """FedScale's own FedBuff confs set no async_mode: aggregator_entry picks the async aggregator."""
    capacity, behaviour = traces(tmp_path)
    path = conf(
        tmp_path,
        *DIGITS,
        "num_participants: 5",
        f"device_conf_file: {capacity}",
        f"device_avail_file: {behaviour}",
        "overcommitment: 1.3",
        top=FEDBUFF_ENTRY,
    )
    report = load(path)
    fedbuff = report.job.fedbuff
    # the buffer is num_participants (FedScale's FedBuff aggregates that many arrivals a round); FedScale's
    # defaults: 100 in flight (all of digits' 100 clients), arrivals over 5 rounds old dropped
    assert (fedbuff.buffer, fedbuff.concurrency, fedbuff.max_staleness) == (5, 100, 5)
    assert ("num_participants: 5", "fedbuff.buffer: 5") in report.mapped
    assert "aggregator_entry" not in dict(report.ignored)  # read, not a cluster key that does not apply
    # a server step ends after `buffer` arrivals: over-commitment does not apply, no round_end is made
    assert report.job.system.round_end.name == "all"
    assert "synchronous rounds only" in dict(report.ignored)["overcommitment"]
    # the same conf with FedScale's synchronous aggregator is a synchronous job
    assert load(conf(tmp_path, *DIGITS, f"device_conf_file: {capacity}")).job.fedbuff is None


def test_async_keys_of_a_synchronous_job_are_named_as_not_applying(tmp_path):
    report = load(conf(tmp_path, *DIGITS, "async_mode: False", "max_concurrency: 10", "async_buffer: 3"))
    assert report.job.fedbuff is None
    assert dict(report.ignored)["max_concurrency"] == keys.ASYNC_ONLY == dict(report.ignored)["async_buffer"]
    assert ("async_mode: False", "synchronous rounds (no fedbuff section)") in report.mapped
    assert report.differs == ()


def test_max_concurrency_must_fit_the_clients(tmp_path):
    small = "fedfleet:\n  data: {clients: 20}\n"
    report = load(conf(tmp_path, *DIGITS, "async_mode: True", top="", extra=small))
    assert report.job.fedbuff.concurrency == 20  # FedScale's default of 100, lowered to every client at once
    assert "fedbuff.concurrency: 20 (all 20 clients; FedScale's default is more)" in dict(report.mapped).values()
    with pytest.raises(ConfigError, match=r"job_conf max_concurrency 30 is larger than the 20 clients"):
        load(conf(tmp_path, *DIGITS, "async_mode: True", "max_concurrency: 30", top="", extra=small))
    # --set on top is fedfleet's own key, checked as any job's
    assert load(conf(tmp_path, *DIGITS, "async_mode: True", top="", extra=small), ["fedbuff.concurrency=7"]).job


def test_an_async_fedscale_conf_runs_server_steps(tmp_path, capsys, one_thread):
    """FedScale's FedBuff conf shape on the command line: clients from the pickled traces, server steps of
    num_participants arrivals, stale ones counted."""
    capacity, behaviour = traces(tmp_path)
    path = conf(
        tmp_path,
        "job_name: digits-fedbuff",
        *DIGITS,
        "num_participants: 3",
        "max_concurrency: 6",
        "max_staleness: 4",
        "rounds: 3",
        "eval_interval: 3",
        "local_steps: 2",
        "batch_size: 8",
        f"device_conf_file: {capacity}",
        f"device_avail_file: {behaviour}",
        top=FEDBUFF_ENTRY,
        extra=f"fedfleet:\n  data: {{clients: 20}}\n  output: {{dir: {tmp_path / 'runs'}, tensorboard: false}}\n",
    )
    assert main(["simulate", "--from-fedscale", str(path), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "not exactly as FedScale applies them" in out.err and "after 3 server steps" in out.out
    run = tmp_path / "runs" / "digits-fedbuff"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["clients"] == 3 for r in rows)  # num_participants arrivals per server step
    assert max(r["staleness_max"] for r in rows) >= 1  # six in flight, three folded a step: some arrive stale
    assert rows[-1]["sim_time_s"] > 0 and "test_accuracy" in rows[-1]
    saved = load_job(run / "config.yaml")
    assert saved.fedbuff.concurrency == 6 and saved.fedbuff.weight_by_examples is False
