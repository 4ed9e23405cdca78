"""Party-driven sync over real gRPC on loopback: parties train on their own schedule and call sync()."""

import threading

import pytest
import torch
from torch import nn

from fedfleet.core.params import FlatParams, bind_module
from fedfleet.runtime.grpc import Connection, PartyRejected, SessionFailed, SyncParty
from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from tests.grpc_jobs import free_port

NAMES = ["guest-9999", "host-10000"]


def tiny_model(seed: int, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def connection(address: str, name: str) -> Connection:
    return Connection(address, "s1", name, credentials=None, heartbeat_s=0.5, max_attempts=20, reconnect_max_s=0.5)


class TrainingParty:
    """A stateful local loop (its own optimizer with momentum) that syncs every ``steps`` steps."""

    def __init__(self, address: str, name: str, seed: int, rounds: int, steps: int = 3, hidden: int = 8) -> None:
        self.model = tiny_model(seed, hidden)
        self.params = bind_module(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + seed)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
        self.rounds, self.steps = rounds, steps
        self.weight = 10.0 + 20 * seed  # unequal weights, so the mean is not a plain average
        self.ctx = SyncParty(self.params.spec, connection(address, name), rounds=rounds)
        self.before_sync: list[FlatParams] = []  # the local params each sync sent (their values)
        self.after_sync: list[FlatParams] = []  # the params each sync returned
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.ctx:
                self.ctx.start(self.params)
                self.after_sync.append(self.params.clone())
                going = True
                while going:
                    for _ in range(self.steps):
                        self.opt.zero_grad()
                        nn.functional.mse_loss(self.model(self.x), self.y).backward()
                        self.opt.step()
                    self.before_sync.append(self.params.clone())
                    going = self.ctx.sync(self.params, self.weight, {"loss": 1.0})
                    self.after_sync.append(self.params.clone())
        except BaseException as exc:
            self.error = exc


def run_session(rounds: int = 3, parties: list[TrainingParty] | None = None, **kw):
    address = f"127.0.0.1:{free_port()}"
    arbiter = SyncArbiter(SyncSessionConfig(session="s1", parties=NAMES, address=address, certs=None, **kw))
    parties = parties or [TrainingParty(address, name, seed, rounds) for seed, name in enumerate(NAMES)]
    for p in parties:
        p.ctx.conn.address = address
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    result: dict = {}

    def serve():
        try:
            result["history"] = arbiter.serve()
        except BaseException as exc:
            result["error"] = exc

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    threads[0].start()
    arbiter.server.spec_known.wait(30)  # the first party in the list sets the layout, the others must match
    for t in threads[1:]:
        t.start()
    for t in [*threads, server]:
        t.join(60)
    return arbiter, parties, result


def test_after_every_sync_each_party_holds_the_weighted_mean():
    arbiter, parties, result = run_session(rounds=3)
    assert "error" not in result, result.get("error")
    for p in parties:
        assert p.error is None, p.error
    guest, host = parties
    # start: everyone holds the first party's initial params (the arbiter has no model of its own)
    assert guest.after_sync[0].allclose(host.after_sync[0], rtol=0, atol=0)
    assert len(guest.before_sync) == len(host.before_sync) == 3
    total = guest.weight + host.weight
    for r in range(3):
        expected = guest.before_sync[r].clone().mul_(guest.weight / total)
        expected.add_(host.before_sync[r], alpha=host.weight / total)
        for p in parties:
            assert p.after_sync[r + 1].allclose(expected, rtol=0, atol=1e-6), f"round {r + 1}"
        assert guest.after_sync[r + 1].allclose(host.after_sync[r + 1], rtol=0, atol=0)
        assert not guest.before_sync[r].allclose(host.before_sync[r])  # they did train apart
    assert arbiter.loop.global_params.allclose(guest.after_sync[-1], rtol=0, atol=0)
    history = result["history"]
    assert [rec.metrics["clients"] for rec in history] == [2.0, 2.0, 2.0]
    assert history[0].metrics["train_loss"] == 1.0


def test_a_party_with_another_architecture_is_refused_by_name():
    address = f"127.0.0.1:{free_port()}"
    good = TrainingParty(address, NAMES[0], 0, rounds=2)
    odd = TrainingParty(address, NAMES[1], 1, rounds=2, hidden=16)
    run_session(rounds=2, parties=[good, odd], wait_timeout=5, join_timeout=2)
    assert isinstance(odd.error, PartyRejected)
    assert "0.weight is [16, 4] float32, expected [8, 4] float32" in str(odd.error)


def test_parties_that_plan_different_numbers_of_syncs_are_told():
    address = f"127.0.0.1:{free_port()}"
    a = TrainingParty(address, NAMES[0], 0, rounds=2)
    b = TrainingParty(address, NAMES[1], 1, rounds=3)
    _, _, result = run_session(parties=[a, b], wait_timeout=5, join_timeout=2)
    assert "different numbers of syncs" in str(result.get("error"))
    for party in (a, b):  # both are told, neither is left waiting (the second used to be refused alone)
        assert isinstance(party.error, SessionFailed) and "different numbers of syncs" in str(party.error)


def test_sync_rejects_a_non_positive_weight():
    ctx = SyncParty(bind_module(tiny_model(0)).spec, connection("127.0.0.1:1", "guest-9999"))
    with pytest.raises(ValueError, match="weight must be > 0"):
        ctx.sync(bind_module(tiny_model(0)), 0.0)


def test_the_first_party_to_join_cannot_fix_the_sessions_length_for_the_others():
    """A party announcing 99 syncs joins first; the two others plan 2: the session runs 2, the odd one is told."""
    names = ["guest-9999", "host-10000", "host-10001"]
    address = f"127.0.0.1:{free_port()}"
    config = SyncSessionConfig(session="s1", parties=names, address=address, certs=None, min_parties=2,
                               join_timeout=10, wait_timeout=30)  # fmt: skip
    arbiter = SyncArbiter(config)
    odd = TrainingParty(address, names[0], 0, rounds=99)
    honest = [TrainingParty(address, name, seed, rounds=2) for seed, name in enumerate(names[1:], start=1)]
    result: dict = {}
    server = threading.Thread(target=lambda: result.update(history=arbiter.serve()), daemon=True)
    server.start()
    threads = [threading.Thread(target=p.run, daemon=True) for p in [odd, *honest]]
    threads[0].start()
    arbiter.server.spec_known.wait(30)  # the odd party joined first and gave the layout
    for t in threads[1:]:
        t.start()
    for t in [*threads, server]:
        t.join(60)
    assert isinstance(odd.error, PartyRejected) and "plans 99 syncs but most parties plan 2" in str(odd.error)
    for p in honest:
        assert p.error is None, p.error
        assert len(p.before_sync) == 2
    assert [r.metrics["clients"] for r in result["history"]] == [2.0, 2.0]
    assert result["history"][-1].metrics["wall_s"] < 5  # no round waits for the refused party to come back
