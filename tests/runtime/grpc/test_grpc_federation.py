"""A real arbiter and real parties over gRPC on loopback (threads of this process; processes elsewhere)."""

import contextlib
import threading
import time

import pytest
import torch

from fedfleet.config import load_job
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.errors import ConfigError
from fedfleet.jobs.deploy import Access, build_arbiter
from fedfleet.jobs.simulation import Simulation
from fedfleet.runtime.grpc import ArbiterServer, Connection, Party, PartyRejected
from fedfleet.runtime.grpc.chunks import iter_chunks
from fedfleet.runtime.grpc.runtime import GrpcRuntime
from fedfleet.runtime.grpc.tls import channel_credentials, server_credentials
from fedfleet.security import init_ca, issue
from tests.grpc_jobs import PARTIES, ThreadedFederation, free_port, make_certs, write_job


def test_a_deployed_run_ends_at_the_simulated_model(tmp_path):
    fed = ThreadedFederation(write_job(tmp_path))
    history = fed.run()
    assert [r.metrics["clients"] for r in history] == [3.0, 3.0, 3.0]
    assert all(r.metrics["rejected"] == 0 for r in history)
    sim = Simulation.from_config(fed.job)
    sim.run()
    deployed, simulated = fed.arbiter.loop.global_params, sim.loop.global_params
    assert not deployed.allclose(sim.trainer.params.zeros_like())
    # the same maths; only the order in which updates arrive (and so the float rounding of the sum) differs
    assert deployed.allclose(simulated, rtol=0, atol=1e-5)


def test_an_arbiter_without_central_evaluation_loads_no_data_and_ends_at_the_same_model(tmp_path, monkeypatch):
    """The data are the parties': with network.central_eval false the arbiter never loads the dataset and
    takes the seeded initial model from the first party, which every party builds identically."""
    import fedfleet.jobs.assemble as assemble

    loads = []
    real = assemble.load_dataset
    monkeypatch.setattr(assemble, "load_dataset", lambda *a, **k: loads.append(a) or real(*a, **k))
    job = write_job(tmp_path)
    fed = ThreadedFederation(job, ["network.central_eval=false"])
    assert loads == [("digits",)] * 3  # the three parties' own, none for the arbiter
    assert fed.arbiter.needs_a_party_to_start and fed.arbiter.server.spec is None
    fed.run()
    sim = Simulation.from_config(fed.job)
    sim.run()
    assert fed.arbiter.loop.global_params.allclose(sim.loop.global_params, rtol=0, atol=1e-5)


class NaNParty(Party):
    def _run(self, task, outbox):
        if task.task != "fit":
            return super()._run(task, outbox)
        update = self.trainer.fit(self.inbox, FitConfig(**task.config), self.train_data)
        update.params.buffers[torch.float32][5] = float("nan")
        outbox.send(self.result_header(task, update.weight, update.metrics, update.params))
        outbox.send(iter_chunks(update.params))


class HugeParty(Party):
    """Finite values near float32's end: twice one of them is inf, so folding it would kill the round."""

    def _run(self, task, outbox):
        if task.task != "fit":
            return super()._run(task, outbox)
        update = self.trainer.fit(self.inbox, FitConfig(**task.config), self.train_data)
        update.params.buffers[torch.float32][5] = 3e38
        outbox.send(self.result_header(task, update.weight, update.metrics, update.params))
        outbox.send(iter_chunks(update.params))


class WrongShapeParty(Party):
    def _run(self, task, outbox):
        if task.task != "fit":
            return super()._run(task, outbox)
        wrong = FlatParams.from_tensors({"w": torch.zeros(10)})
        outbox.send(self.result_header(task, 1.0, {}, wrong))
        outbox.send(iter_chunks(wrong))


class StaleThenGoodParty(Party):
    """Replays its answer with an old round number and twice, before and after the good one."""

    def _run(self, task, outbox):
        if task.task != "fit":
            return super()._run(task, outbox)
        update = self.trainer.fit(self.inbox, FitConfig(**task.config), self.train_data)
        stale = self.result_header(task, update.weight, update.metrics, update.params)
        stale.round -= 1
        for header in (stale, self.result_header(task, update.weight, update.metrics, update.params)):
            outbox.send(header)
            outbox.send(iter_chunks(update.params))
        outbox.send(self.result_header(task, update.weight, update.metrics, update.params))  # a duplicate
        outbox.send(iter_chunks(update.params))


class SlowParty(Party):
    """Answers a fit task a moment later, so a cheat's repeated answers reach a round that is still open."""

    def _run(self, task, outbox):
        if task.task == "fit":
            time.sleep(0.3)
        return super()._run(task, outbox)


@pytest.mark.parametrize(
    "cheat, reason, folded",
    [
        (NaNParty, "rejected_values", 2.0),
        (HugeParty, "rejected_values", 2.0),
        (WrongShapeParty, "rejected_layout", 2.0),
        (StaleThenGoodParty, None, 3.0),
    ],
)
def test_bad_updates_are_rejected_and_the_round_goes_on(tmp_path, cheat, reason, folded):
    classes = {"host-10001": cheat, "guest-9999": SlowParty, "host-10000": SlowParty}
    fed = ThreadedFederation(write_job(tmp_path), ["network.min_parties=2", "rounds=2"], party_class=classes)
    history = fed.run()
    for record in history:
        assert record.metrics["clients"] == folded
        if reason:
            assert record.metrics[reason] == 1.0
        else:  # one stale and one duplicate per round
            assert record.metrics["rejected_stale"] == 1.0 and record.metrics["rejected_duplicate"] == 1.0
    assert fed.arbiter.loop.global_params.isfinite()


class EchoTrainer:
    """Answers every fit with a delta of (its index + 1) everywhere, so the aggregate is known exactly."""

    def __init__(self, params: FlatParams, value: float) -> None:
        self.params = params
        self.value = value

    def fit(self, params, config, data=None):
        delta = params.zeros_like()
        for buf in delta.buffers.values():
            buf.fill_(self.value)
        return Update(delta, weight=1.0)

    def evaluate(self, params, data=None):
        return {"examples": 1.0}


def test_a_model_larger_than_many_chunks_streams_exactly(tmp_path):
    spec_params = FlatParams.from_tensors({"big": torch.zeros(3_000_000), "half": torch.zeros(100_000).half()})
    port = free_port()
    server = ArbiterServer(
        session="s", parties=PARTIES, spec=spec_params.spec, address=f"127.0.0.1:{port}", credentials=None
    )
    runtime = GrpcRuntime(
        server,
        min_parties=3,
        round_timeout=60,
        join_timeout=30,
        wait_timeout=60,
        chunk_bytes=1 << 20,
        federated_eval=False,
    )
    server.start()
    threads = []
    for i, name in enumerate(PARTIES):
        conn = Connection(f"127.0.0.1:{port}", "s", name, None, chunk_bytes=1 << 20)
        party = Party(EchoTrainer(spec_params.zeros_like(), i + 1.0), None, None, conn)
        threads.append(threading.Thread(target=party.run, daemon=True))
        threads[-1].start()
    try:
        glob = spec_params.zeros_like()
        total = glob.zeros_like()
        for update in runtime.fit(glob, [0, 1, 2], FitConfig()):
            total.add_(update.params)
        for buf in total.buffers.values():
            assert torch.all(buf == 6.0)  # 1 + 2 + 3, every element, in both dtypes
    finally:
        runtime.finish()
        server.stop(0.5)


def run_until_refused(party: Party) -> None:
    with contextlib.suppress(PartyRejected):
        party.run()


def test_a_round_does_not_wait_for_a_party_that_left_before_its_task(monkeypatch):
    """The race CI hit: a party is present when the round starts, and its stream ends before the round's tasks go
    out, so its GONE event is drained with the stale ones. The round must see it gone within a second or two, not
    wait out the round timeout (a day in sync mode), with the server's handler threads blocking the exit."""
    spec_params = FlatParams.from_tensors({"w": torch.zeros(10)})
    port = free_port()
    server = ArbiterServer(session="s", parties=PARTIES, spec=spec_params.spec, address=f"127.0.0.1:{port}",
                           credentials=None)  # fmt: skip
    runtime = GrpcRuntime(server, min_parties=2, round_timeout=60, join_timeout=30, wait_timeout=60,
                          federated_eval=False)  # fmt: skip
    server.start()
    parties = [Party(EchoTrainer(spec_params.zeros_like(), i + 1.0), None, None,
                     Connection(f"127.0.0.1:{port}", "s", name, None)) for i, name in enumerate(PARTIES)]  # fmt: skip
    for party in parties:
        threading.Thread(target=run_until_refused, args=(party,), daemon=True).start()
    leaving = PARTIES[2]
    drain = runtime._drain_stale

    def leave_then_drain():  # after the round counted the party present, before it sends the tasks
        server.refuse(leaving, "leaves for the test")
        deadline = time.monotonic() + 10
        while server.link(leaving) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # its GONE event is queued by now, and drained next
        drain()

    try:
        with server.changed:
            assert server.changed.wait_for(lambda: len(server.connected()) == 3, 30)
        monkeypatch.setattr(runtime, "_drain_stale", leave_then_drain)
        start = time.monotonic()
        glob = spec_params.zeros_like()
        total = glob.zeros_like()
        for update in runtime.fit(glob, [0, 1, 2], FitConfig()):
            total.add_(update.params)
        assert time.monotonic() - start < 10
        assert torch.all(total.buffers[torch.float32] == 3.0)  # 1 + 2: the two that stayed
        metrics = runtime.round_metrics()
        assert (metrics["parties"], metrics["lost"], metrics["timed_out"]) == (3.0, 1.0, 0.0)
    finally:
        runtime.finish()
        server.stop(0.5)


def test_mtls_refuses_a_certificate_from_another_ca(tmp_path):
    good, other = tmp_path / "good", tmp_path / "other"
    make_certs(good, PARTIES)
    init_ca(other)
    issue(other, "guest-9999")
    port = free_port()
    spec = FlatParams.from_tensors({"w": torch.zeros(3)}).spec
    server = ArbiterServer(
        session="s", parties=PARTIES, spec=spec, address=f"127.0.0.1:{port}", credentials=server_credentials(good)
    )
    server.start()
    try:
        conn = Connection(
            f"127.0.0.1:{port}",
            "s",
            "guest-9999",
            channel_credentials(other, "guest-9999"),
            max_attempts=2,
            reconnect_max_s=0.2,
        )
        party = Party(EchoTrainer(FlatParams.zeros(spec), 1.0), None, None, conn)
        with pytest.raises(ConnectionError):
            party.run()
        assert server.connected() == []

        # a certificate of the right CA for a name that is not a party of the session is refused by name
        issue(good, "guest-1")
        conn = Connection(f"127.0.0.1:{port}", "s", "guest-1", channel_credentials(good, "guest-1"))
        with pytest.raises(PartyRejected, match="not a party"):
            Party(EchoTrainer(FlatParams.zeros(spec), 1.0), None, None, conn).run()

        # a party cannot claim another's name: its certificate decides
        conn = Connection(f"127.0.0.1:{port}", "s", "host-10000", channel_credentials(good, "guest-9999"))
        with pytest.raises(PartyRejected, match="certificate is for 'guest-9999'"):
            Party(EchoTrainer(FlatParams.zeros(spec), 1.0), None, None, conn).run()

        # nor join a session it is not in
        conn = Connection(f"127.0.0.1:{port}", "other-session", "guest-9999", channel_credentials(good, "guest-9999"))
        with pytest.raises(PartyRejected, match="session"):
            Party(EchoTrainer(FlatParams.zeros(spec), 1.0), None, None, conn).run()
    finally:
        server.stop(0.5)


def test_an_arbiter_refuses_a_job_with_fedbuff(tmp_path):
    job = load_job(str(write_job(tmp_path, "\nfedbuff: {buffer: 2}\n")), [])
    with pytest.raises(ConfigError, match="fedbuff runs on the virtual clock of a simulation"):
        build_arbiter(job, Access(True, "certs", job.network.address))


def test_a_job_file_cannot_turn_tls_off_without_the_command_line_flag(tmp_path):
    from fedfleet.jobs.deploy import access_of

    job = load_job(write_job(tmp_path), ["network.insecure=true"])
    with pytest.raises(ConfigError, match="confirm with --insecure on the command line"):
        access_of(job)
    assert access_of(job, insecure=True).insecure
    assert not access_of(load_job(write_job(tmp_path))).insecure  # the default: mutual TLS


def test_a_deployed_rounds_records_carry_wall_time_not_a_simulated_clock(tmp_path):
    history = ThreadedFederation(write_job(tmp_path), ["rounds=2"]).run()
    for record in history:
        assert "wall_s" in record.metrics and "wall_time_s" in record.metrics
        assert not {"sim_round_s", "sim_time_s"} & record.metrics.keys()
