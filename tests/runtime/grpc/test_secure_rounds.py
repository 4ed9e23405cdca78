"""Secure aggregation over gRPC: a real arbiter and four real parties in threads, on mutual TLS over loopback.

The arbiter only ever holds masked inputs; the round's model must still be the simulation's (to float rounding:
the unmasked sum is an exact integer sum, the same whatever order the inputs arrive in) and the plain round's
within the quantisation bound. A round that falls below the threshold fails cleanly and is run again.
"""

import dataclasses
import logging
import re
from typing import ClassVar

import pytest

from fedfleet.config import load_job
from fedfleet.errors import ConfigError
from fedfleet.jobs.deploy import Access, build_arbiter
from fedfleet.jobs.simulation import Simulation
from fedfleet.runtime.grpc import Party
from fedfleet.runtime.grpc.secure_party import SecureStages
from fedfleet.runtime.grpc.wire import PROTOCOL, Failure, Reject, Welcome
from fedfleet.secagg import SecAggParty
from tests.rogue import RawStream, wait_for
from tests.runtime.grpc.secure_helpers import FOUR, PARTIES4, secure_federation, secure_job
from tests.runtime.grpc.test_hostile_party import join_frame


def largest_difference(a, b) -> float:
    return max((a.buffers[d] - b.buffers[d]).abs().max().item() for d in a.buffers)


@pytest.mark.parametrize("ahead", [True, False], ids=["masks-made-ahead", "masks-made-at-fit"])
def test_a_secure_grpc_round_ends_at_the_simulated_secure_model_and_near_the_plain_one(tmp_path, monkeypatch, ahead):
    calls = []  # (party, what, the buffer it was given, the one it filled)
    masked_input, prepare_masks = SecAggParty.masked_input, SecAggParty.prepare_masks

    def recorded(self, values, weight, inbox, out=None):
        masked = masked_input(self, values, weight, inbox, out=out)
        calls.append((self.party, "input", out, masked.data))
        return masked

    def recorded_prepare(self, inbox, length, out=None):
        prepare_masks(self, inbox, length, out=out)
        calls.append((self.party, "prepare", out, self._prepared[1]))

    monkeypatch.setattr(SecAggParty, "masked_input", recorded)
    monkeypatch.setattr(SecAggParty, "prepare_masks", recorded_prepare)
    monkeypatch.setattr(SecureStages, "prepare_masks", ahead)
    fed = secure_federation(tmp_path, ["rounds=3"])
    history = fed.run()
    # from round 2 on, each party masks into its last round's buffer (ahead of the update, or at fit): its
    # upload was done (and the model is still the simulation's below, so nothing read it while it was rewritten)
    for party in range(1, 5):
        mine = [(what, out, data) for p, what, out, data in calls if p == party]
        (_, _, first), given = mine[0], [out for _, out, _ in mine[1:]]
        expected = ["input", "prepare", "input", "prepare", "input"] if ahead else ["input"] * 3
        assert [what for what, _, _ in mine] == expected
        assert mine[0][1] is None and all(data is first for _, _, data in mine)
        assert all(out is first for out in given if out is not None)
        assert [out is None for out in given] == ([False, True] * 2 if ahead else [False, False])
    for record in history:
        m = record.metrics
        assert m["clients"] == 4.0 and m["rejected"] == 0.0
        assert [m[f"secagg_{k}"] for k in ("advertised", "shared", "masked", "unmasked")] == [4.0] * 4
    sim = Simulation.from_config(fed.job)  # the same job in process: InProcessSecureSum plays the parties
    sim.run()
    assert largest_difference(fed.arbiter.loop.global_params, sim.loop.global_params) < 1e-6

    # one round beside the plain one: within the documented bound of the quantised weighted mean
    one = secure_federation(tmp_path / "one", ["rounds=1"])
    (record,) = one.run()
    plain = Simulation.from_config(dataclasses.replace(one.job, secure_aggregation=None))
    plain.run()
    difference = largest_difference(one.arbiter.loop.global_params, plain.loop.global_params)
    assert 0 < difference <= record.metrics["secagg_mean_bound"]


class FailsOnceAtMasking(Party):
    """Sends a failure instead of its first masked input: a dropout after its shares, once."""

    failed: ClassVar[set[str]] = set()

    def _run(self, task, outbox):
        if task.task == "fit" and self.conn.name not in self.failed:
            self.failed.add(self.conn.name)
            outbox.send(Failure(task_id=task.task_id, round=task.round, reason="gone for a moment"))
            return
        super()._run(task, outbox)


def test_a_round_below_the_threshold_fails_cleanly_and_its_retry_folds_only_itself(tmp_path, caplog):
    """Two of four drop after their shares: each survivor's self-mask seed has one live holder, below t = 2.
    Nothing of the failed attempt is folded: the run ends at the model of a run without the dropouts."""
    FailsOnceAtMasking.failed = set()
    dropping = {name: FailsOnceAtMasking for name in PARTIES4[:2]}
    fed = secure_federation(tmp_path, ["rounds=1", "network.min_parties=2"], party_class=dropping)
    with caplog.at_level(logging.WARNING, logger="fedfleet.core.loop"):
        (record,) = fed.run()
    assert "held by 1 live neighbours, fewer than the threshold 2" in caplog.text
    assert "running round 1 again (attempt 2 of 3)" in caplog.text
    assert record.metrics["clients"] == 4.0
    sim = Simulation.from_config(fed.job)
    sim.run()
    assert largest_difference(fed.arbiter.loop.global_params, sim.loop.global_params) < 1e-6


# -- bad input: one clear message each, before the round starts ------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ("{neighbours: 3}", r"neighbours \(k\) must be an int with 1 <= k < n = 3 .* network.min_parties is 3"),
        ("{threshold: 3}", r"threshold \(t\) must satisfy k/2 < t <= k, i.e. 2 <= t <= 2, .*network.min_parties is 3"),
    ],
)
def test_k_or_t_that_do_not_fit_the_smallest_round_are_refused_before_the_arbiter_starts(tmp_path, settings, message):
    job = load_job(secure_job(tmp_path, f"secure_aggregation: {settings}\n"), [*FOUR, "network.min_parties=3"])
    with pytest.raises(ConfigError, match=message):
        build_arbiter(job, Access(True, "certs", job.network.address))


def test_a_strategy_without_a_weighted_mean_is_refused_before_any_party_is_asked(tmp_path):
    job = load_job(secure_job(tmp_path), [*FOUR, "strategy.name=qfedavg"])
    loop = build_arbiter(job, Access(True, "certs", job.network.address)).loop
    with pytest.raises(ConfigError, match=r"aggregates with .*, which needs each update"):
        loop.run_round(0)  # the server never started: no party was asked anything


def test_a_party_of_another_protocol_or_without_secure_aggregation_is_refused_at_join(tmp_path):
    fed = secure_federation(tmp_path)
    server = fed.arbiter.server
    server.start()
    try:
        values = {"neighbours": None, "threshold": 0.5, "clip": 1.0, "bits": 16, "max_weight": 1000.0}
        cases = [
            ({"protocol": 5, "secure_aggregation": values}, f"protocol 5 is not this arbiter's {PROTOCOL}"),
            ({}, "this arbiter's job has secure_aggregation .* and host-10002's does not"),
            ({"secure_aggregation": {**values, "bits": 8}}, "host-10002's job has secure_aggregation .*'bits': 8"),
        ]
        for fields, reason in cases:
            stream = RawStream(fed.job.network.address, tmp_path / "certs", "host-10002")
            stream.send(join_frame(fed, "host-10002", **fields))
            answer = stream.next_message()
            assert isinstance(answer, Reject), answer
            assert re.search(reason, answer.reason), answer.reason
            stream.close()
        stream = RawStream(fed.job.network.address, tmp_path / "certs", "host-10002")
        stream.send(join_frame(fed, "host-10002", secure_aggregation=values))
        assert isinstance(stream.next_message(), Welcome)
        stream.close()
        assert wait_for(lambda: not server.connected())
    finally:
        server.stop(0.5)


def test_a_model_less_arbiter_runs_secure_rounds_and_evaluates_them_with_the_parties(tmp_path):
    """The layout comes from the first party (its seeded initial model, the same for all: no private data), the
    masked layout from it; the parties' evaluations after each secure round are plain metrics."""
    fed = secure_federation(tmp_path, ["rounds=2", "eval_every=1", "network.central_eval=false"])
    history = fed.run()
    assert [r.metrics["clients"] for r in history] == [4.0, 4.0]
    assert all("test_party_accuracy" in r.metrics for r in history), history[-1].metrics
    sim = Simulation.from_config(fed.job)
    sim.run()
    assert largest_difference(fed.arbiter.loop.global_params, sim.loop.global_params) < 1e-6
