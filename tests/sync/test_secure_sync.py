"""Party-paced secure aggregation over real gRPC on loopback: SyncParty parties train on their own schedule,
mask their deltas (SecAgg+) at each sync, and the sync arbiter unmasks only the round's weighted sum.

Four parties, not three: with k = n - 1 = 2 and t = 2 no dropout after the shares is survivable; four
(k = 3, t = 2) survive one (docs/secure-aggregation.md, "How many parties").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from fedfleet.core.params import FlatParams, bind_module
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import PartyRejected, SessionFailed
from fedfleet.runtime.grpc.arbiter import EventKind
from fedfleet.runtime.grpc.secure_wire import MASKED_NAME, ring_vector
from fedfleet.runtime.grpc.wire import Failure
from fedfleet.secagg.config import for_parties
from fedfleet.secagg.quantize import dequantize
from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from fedfleet.sync.context import create_context
from tests.grpc_jobs import free_port, make_certs
from tests.paths import ROOT

NAMES = ["guest-9999", "host-10000", "host-10001", "host-10002"]
PARTIES = [("guest", "9999"), ("host", "10000"), ("host", "10001"), ("host", "10002"), ("arbiter", "10000")]
HIDDEN = 64  # 385 params: enough for a correlation to say something


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def context(address: str, index: int, certs=None, parties=PARTIES):
    ctx = create_context(parties[index], parties, "s-secure", address, certs=certs, insecure=certs is None)
    return dataclasses.replace(ctx, heartbeat_s=0.5, reconnect_max_s=0.5, connect_attempts=20)


class Trainer:
    """A stateful local loop (SGD with momentum) that syncs every ``steps`` steps through ``ctx.channel``."""

    def __init__(self, ctx, seed: int, rounds: int, secure=True, steps: int = 3, die_after: int | None = None):
        self.ctx, self.name = ctx, ctx.name
        self.model = tiny_model(seed)
        self.params = bind_module(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + seed)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
        self.weight = 10.0 + 20 * (seed % 4)  # unequal weights: the mean is not a plain average
        self.steps, self.die_after = steps, die_after
        self.channel = ctx.channel(self.params.spec, rounds, secure=secure)
        self.before: list[FlatParams] = []  # what each sync sent (the local params)
        self.after: list[FlatParams] = []  # what start and each sync loaded (index 0: the start)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name=f"train-{self.name}", daemon=True)

    def run(self) -> None:
        try:
            with self.channel:
                self.channel.start(self.params, timeout=60)
                self.after.append(self.params.clone())
                going = True
                while going:
                    if self.die_after is not None and len(self.before) == self.die_after:
                        return  # stops with the next round's shares sent, before its masked input
                    for _ in range(self.steps):
                        self.opt.zero_grad()
                        nn.functional.mse_loss(self.model(self.x), self.y).backward()
                        self.opt.step()
                    self.before.append(self.params.clone())
                    going = self.channel.sync(self.params, self.weight, {"loss": 1.0}, timeout=60)
                    self.after.append(self.params.clone())
        except BaseException as exc:
            self.error = exc


class Recording(queue.Queue):
    """The arbiter's event queue, keeping a copy of every update it received (what reached its memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[tuple[str, int, FlatParams]] = []

    def put(self, event, *args, **kwargs):
        if event.kind == EventKind.UPDATE and event.round >= 0:  # round -1: the first party's initial params
            self.updates.append((event.party, event.round, event.params.clone()))
        super().put(event, *args, **kwargs)


class Session:
    """An arbiter serving in a thread; every gRPC server is stopped before the test ends."""

    def __init__(self, names=NAMES, **kw) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        defaults = dict(join_timeout=10, wait_timeout=60, certs=None)
        config = SyncSessionConfig(session="s-secure", parties=names, address=self.address, **{**defaults, **kw})
        self.arbiter = SyncArbiter(config)
        self.arbiter.server.events = self.recording = Recording()
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._serve, name="arbiter", daemon=True)

    def _serve(self) -> None:
        try:
            self.outcome["history"] = self.arbiter.serve()
        except BaseException as exc:
            self.outcome["error"] = exc

    def run(self, trainers: list[Trainer], timeout: float = 120) -> dict:
        self.thread.start()
        try:
            trainers[0].thread.start()
            assert self.arbiter.server.spec_known.wait(30)  # the first party's layout and initial params
            for t in trainers[1:]:
                if not t.thread.is_alive() and t.thread.ident is None:
                    t.thread.start()
            for t in [*trainers, self]:
                t.thread.join(timeout)
            assert not self.thread.is_alive(), "the arbiter did not end"
        finally:
            for t in trainers:
                t.channel.close()
            if self.thread.is_alive():  # a failed test must not leave a server behind
                self.arbiter.server.stop(grace=0.5)
                self.thread.join(10)
        return self.outcome


def weighted_mean(trainers: list[Trainer], r: int, offset: dict | None = None) -> FlatParams:
    offset = offset or {}
    total = sum(t.weight for t in trainers)
    mean = None
    for t in trainers:
        part = t.before[r - offset.get(t.name, 0)].clone().mul_(t.weight / total)
        mean = part if mean is None else mean.add_(part)
    return mean


def largest_difference(a: FlatParams, b: FlatParams) -> float:
    return max(float((a.buffers[d] - b.buffers[d]).abs().max()) for d in a.buffers)


def flat(params: FlatParams) -> np.ndarray:
    return torch.cat([b.reshape(-1).double() for b in params.buffers.values()]).numpy()


def test_after_every_secure_sync_each_party_holds_the_weighted_mean_and_the_arbiter_only_masked_inputs(tmp_path):
    make_certs(tmp_path / "certs", NAMES)  # mutual TLS: adverts signed and checked against the CA
    session = Session(certs=str(tmp_path / "certs"))  # secure_aggregation left to the parties: all ask for it
    trainers = [Trainer(context(session.address, i, tmp_path / "certs"), i, rounds=3) for i in range(4)]
    outcome = session.run(trainers)
    assert "error" not in outcome, outcome.get("error")
    assert [t.error for t in trainers] == [None] * 4
    history = outcome["history"]
    assert len(history) == 3
    assert session.arbiter.runtime.secure_aggregation == for_parties(4)
    for r, record in enumerate(history):
        m = record.metrics
        assert [m[f"secagg_{k}"] for k in ("advertised", "shared", "masked", "unmasked")] == [4.0] * 4
        assert m["clients"] == 4.0 and m["rejected"] == 0.0
        expected = weighted_mean(trainers, r)
        for t in trainers:  # the mean of what they sent, to the quantisation bound (and float32 rounding)
            assert largest_difference(t.after[r + 1], expected) <= m["secagg_mean_bound"] + 1e-6, (t.name, r)
            assert largest_difference(t.after[r + 1], trainers[0].after[r + 1]) == 0.0  # all hold the same
        assert not trainers[0].before[r].allclose(trainers[1].before[r])  # they trained apart
    assert largest_difference(session.arbiter.loop.global_params, trainers[0].after[-1]) == 0.0

    # what the arbiter received: one masked input per party and round, none of them an update it can read
    received = session.recording.updates
    assert sorted((name, r) for name, r, _ in received) == sorted((n, r) for n in NAMES for r in range(3))
    config, numel = for_parties(4), trainers[0].params.numel
    for name, r, masked in received:
        assert masked.spec.names == [MASKED_NAME] and masked.numel == numel + 1  # not the model's layout
        t = next(t for t in trainers if t.name == name)
        delta = flat(t.before[r]) - flat(trainers[0].after[r])  # the party's true update
        factor = t.weight / config.max_weight
        # read as if unmasked: its quantised, weight-scaled delta, within step / factor (about 2e-7) of the truth
        read = dequantize(ring_vector(masked)[:-1], 1, config.clip, config.bits) / factor
        assert np.abs(read - delta).mean() > 0.1  # far beyond the quantisation: it is masked
        assert abs(np.corrcoef(ring_vector(masked)[:-1].astype(np.float64), delta)[0, 1]) < 0.3


def test_a_party_stopped_after_its_shares_is_survived_and_can_rejoin_later_rounds():
    """host-10002 stops with round 2's shares sent, before its masked input: round 2 commits with the other three
    (the dead party's pairwise masks rebuilt from its shares); it restarts and takes part in round 3 on."""
    session = Session(min_parties=3)
    trainers = [Trainer(context(session.address, i), i, rounds=4, die_after=1 if i == 3 else None) for i in range(4)]
    rejoined = Trainer(context(session.address, 3), 3, rounds=0)  # rounds 0: it takes what the session has left

    def restart() -> None:
        deadline = time.monotonic() + 60
        while trainers[3].thread.ident is None and time.monotonic() < deadline:
            time.sleep(0.05)
        trainers[3].thread.join(60)  # the first run of host-10002 stopped: start it again
        rejoined.thread.start()

    threading.Thread(target=restart, daemon=True).start()
    try:
        outcome = session.run(trainers)
        rejoined.thread.join(60)
    finally:
        rejoined.channel.close()
    assert "error" not in outcome, outcome.get("error")
    assert [t.error for t in [*trainers, rejoined]] == [None] * 5
    history = outcome["history"]
    assert len(history) == 4
    second = history[1].metrics
    assert (second["secagg_shared"], second["secagg_masked"], second["secagg_unmasked"]) == (4.0, 3.0, 3.0)
    assert second["clients"] == 3.0 and second["lost"] == 1.0
    bound = second["secagg_mean_bound"] + 1e-6
    assert largest_difference(trainers[0].after[2], weighted_mean(trainers[:3], 1)) <= bound
    assert largest_difference(rejoined.after[0], trainers[0].after[2]) == 0.0  # it rejoined at round 3's start
    everyone = [*trainers[:3], rejoined]
    for r in (2, 3):
        m = history[r].metrics
        assert m["secagg_masked"] == 4.0
        expected = weighted_mean(everyone, r, offset={rejoined.name: 2})
        for t in everyone:
            got = t.after[r + 1 - (2 if t is rejoined else 0)]
            assert largest_difference(got, expected) <= m["secagg_mean_bound"] + 1e-6, (t.name, r)


@pytest.mark.parametrize(
    "secure, min_parties, why",
    [(True, 2, "fewer than the threshold 2"), (False, 3, "2 good update(s), fewer than min_parties=3")],
)
def test_a_round_below_the_threshold_fails_cleanly_and_is_retried_with_the_same_work(caplog, secure, min_parties, why):
    """Two of four send no masked input in round 1's first attempt: each survivor's self-mask seed has one live
    holder, below t = 2, so nothing is folded; the retry (fresh keys) brings all four, each answering with the
    update it trained, without training again or spending a sync: two syncs planned, two rounds, one retry.
    A plain session below min_parties is retried alike."""
    session = Session(min_parties=min_parties, secure_aggregation=secure)
    trainers = [Trainer(context(session.address, i), i, rounds=2, secure=secure) for i in range(4)]
    for t in trainers[2:]:
        answer, failed = t.channel._answer, []

        def drop_once(task, params, ans, outbox, answer=answer, failed=failed, channel=t.channel):
            if not failed:  # a dropout after the shares, once: its answer is a failure
                failed.append(task.round)
                channel._answered = (task.round, ans)
                outbox.send(Failure(task_id=task.task_id, round=task.round, reason="gone for a moment"))
                return
            answer(task, params, ans, outbox)

        t.channel._answer = drop_once
    with caplog.at_level(logging.WARNING, logger="fedfleet.core.loop"):
        outcome = session.run(trainers)
    assert "error" not in outcome, outcome.get("error")
    assert [t.error for t in trainers] == [None] * 4
    assert why in caplog.text
    assert "running round 1 again (attempt 2 of 3)" in caplog.text
    history = outcome["history"]
    assert len(history) == 2 and all(len(t.before) == 2 for t in trainers)
    for r, record in enumerate(history):
        assert record.metrics["clients"] == 4.0
        assert record.metrics.get("secagg_masked", 4.0) == 4.0
        expected = weighted_mean(trainers, r)  # nothing of the failed attempt in it
        for t in trainers:
            assert largest_difference(t.after[r + 1], expected) <= record.metrics.get("secagg_mean_bound", 0) + 1e-6


# -- a mix of secure and plain parties is refused, by name -------------------------------------------------
TWO = ["guest-9999", "host-10000"]
PARTIES2 = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]


def pair(session: Session, secure: list[bool]) -> list[Trainer]:
    return [Trainer(context(session.address, i, parties=PARTIES2), i, 2, secure=s) for i, s in enumerate(secure)]


def test_parties_that_disagree_on_the_aggregator_are_named_and_the_session_ends():
    session = Session(names=TWO, join_timeout=5)
    trainers = pair(session, [True, False])
    outcome = session.run(trainers)
    message = "guest-9999 ask for aggregator='secure' and host-10000 for 'plain'"
    assert isinstance(outcome.get("error"), ConfigError) and message in str(outcome["error"])
    for t in trainers:  # both are told, neither sent an update
        assert isinstance(t.error, SessionFailed) and message in str(t.error), t.error
    assert session.recording.updates == []


@pytest.mark.parametrize(
    "arbiter, parties, refused",
    [
        (True, [True, False], "host-10000 syncs with aggregator='plain' and this session is secure"),
        (False, [False, True], "host-10000 asks for aggregator='secure' and this session aggregates in plain"),
    ],
)
def test_a_party_whose_aggregator_is_not_the_sessions_is_refused_by_name(arbiter, parties, refused):
    session = Session(names=TWO, join_timeout=3, wait_timeout=10, secure_aggregation=arbiter)
    trainers = pair(session, parties)
    session.run(trainers)
    assert isinstance(trainers[1].error, PartyRejected) and refused in str(trainers[1].error), trainers[1].error
    assert isinstance(trainers[0].error, SessionFailed)  # not left waiting for a party that cannot come
    assert session.recording.updates == []


def test_secure_settings_that_cannot_run_are_refused_before_the_arbiter_starts():
    with pytest.raises(ConfigError, match=r"at least 2 parties in a round, got 1 .*min_parties is 1"):
        SyncArbiter(SyncSessionConfig(session="s", parties=TWO, certs=None, min_parties=1, secure_aggregation=True))


# -- a party process SIGKILLed after its shares ---------------------------------------------------------------
DOOMED = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.sync.test_secure_sync import Trainer, context
party = Trainer(context({address!r}, 3), 3, rounds=3)
party.channel.start(party.params, timeout=60)
party.channel.sync(party.params, party.weight, {{}}, timeout=60)
print("synced", flush=True)  # round 2's keys and shares are out: its sync task is here
time.sleep(600)
"""


@pytest.mark.slow
def test_a_party_process_killed_after_its_shares_is_survived_and_the_session_goes_on_without_it():
    session = Session(min_parties=3, join_timeout=3)
    trainers = [Trainer(context(session.address, i), i, rounds=3) for i in range(3)]
    code = textwrap.dedent(DOOMED).format(repo=str(ROOT), address=session.address)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    doomed = None
    session.thread.start()
    try:
        trainers[0].thread.start()
        assert session.arbiter.server.spec_known.wait(30)
        doomed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for t in trainers[1:]:
            t.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and doomed.stdout.readline().strip() != "synced":
            assert doomed.poll() is None, "the party process ended before its first sync"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        for t in [*trainers, session]:
            t.thread.join(120)
    finally:
        if doomed is not None and doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)
        for t in trainers:
            t.channel.close()
        if session.thread.is_alive():
            session.arbiter.server.stop(grace=0.5)
            session.thread.join(10)
    outcome = session.outcome
    assert "error" not in outcome, outcome.get("error")
    assert [t.error for t in trainers] == [None] * 3
    history = outcome["history"]
    assert len(history) == 3
    assert history[0].metrics["secagg_masked"] == 4.0
    second = history[1].metrics
    assert (second["secagg_shared"], second["secagg_masked"], second["secagg_unmasked"]) == (4.0, 3.0, 3.0)
    assert history[2].metrics["secagg_advertised"] == 3.0  # the session goes on without it
    for r in (1, 2):
        expected = weighted_mean(trainers, r)
        for t in trainers:
            assert largest_difference(t.after[r + 1], expected) <= history[r].metrics["secagg_mean_bound"] + 1e-6
