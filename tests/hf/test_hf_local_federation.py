"""The in-process federation's failure modes and guarantees: nothing hangs, seeded runs repeat, the loss
sent with a sync is the round's own."""

import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, FedAvgServer, LocalFederation, create_context
from fedfleet.runtime.grpc import SessionFailed
from tests.grpc_jobs import free_port
from tests.hf_parties import make_client, review_shares, tiny_gpt2


def train_all(clients, join_s=120):
    """Train each client in its own thread; the exception each raised (None: finished)."""
    outcome: dict[int, BaseException | None] = {}

    def run(i, client):
        try:
            client.train()
            outcome[i] = None
        except BaseException as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    assert not any(t.is_alive() for t in threads), "a party hung"
    return [outcome[i] for i in range(len(clients))]


def test_parties_planning_different_sync_counts_are_refused_not_hung(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2, timeout=60)
    a, *_ = make_client(fed.context(0), csvs[0], 0, FedArguments("epoch", 1), tmp_path / "a", epochs=1)
    b, *_ = make_client(fed.context(1), csvs[1], 1, FedArguments("epoch", 1), tmp_path / "b", epochs=2)
    errors = train_all([a, b])
    for error in errors:
        assert isinstance(error, ConfigError)
        assert "party-0: 1, party-1: 2" in str(error)


class FailAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise RuntimeError("disk full (injected)")


def test_a_failing_party_makes_the_others_raise_instead_of_waiting(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=64)
    fed = LocalFederation(2, timeout=60)
    a, *_ = make_client(fed.context(0), csvs[0], 0, FedArguments("step", 1), tmp_path / "a")
    b, *_ = make_client(fed.context(1), csvs[1], 1, FedArguments("step", 1), tmp_path / "b")
    b.add_callback(FailAt(3))
    started = time.monotonic()
    error_a, error_b = train_all([a, b])
    assert "disk full" in str(error_b)
    assert isinstance(error_a, RuntimeError)
    assert "party-1 left after 3 of 8 syncs" in str(error_a)
    assert time.monotonic() - started < 50  # not the 60 s timeout


def test_a_start_or_sync_without_the_others_times_out_naming_them():
    spec = ParamSpec([("w", (3,), torch.float32)])
    fed = LocalFederation(2, timeout=0.3)
    channel = fed.context(0).channel(spec, rounds=2)
    with pytest.raises(TimeoutError, match="at the start for party-1"):
        channel.start(FlatParams.zeros(spec))

    fed = LocalFederation(2, timeout=30)
    channels = [fed.context(i).channel(spec, rounds=2) for i in range(2)]
    other = threading.Thread(target=channels[1].start, args=(FlatParams.zeros(spec),), daemon=True)
    other.start()  # party 1 starts, then never syncs
    params = FlatParams.zeros(spec)
    channels[0].start(params)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="at sync 1 for party-1"):
        channels[0].sync(params, 1.0, timeout=0.2)  # a call's own limit wins over the federation's
    assert time.monotonic() - started < 1.5


def run_pair(tmp_path, tag, fed_args, reproducible=True):
    csvs = review_shares(tmp_path / "data", 2, reviews=48)
    fed = LocalFederation(2, reproducible=reproducible)
    pairs = [make_client(fed.context(i), csvs[i], i, fed_args, tmp_path / f"{tag}{i}") for i in range(2)]
    assert train_all([c for c, _, _ in pairs]) == [None, None]
    return pairs


def test_seeded_in_process_runs_repeat_bit_for_bit(tmp_path):
    """Dropout draws from torch's process-wide generator; without per-party states the threads interleave."""
    first, second = (run_pair(tmp_path, tag, FedArguments("step", 2)) for tag in ("x", "y"))
    model = first[0][0].model
    assert model.config.resid_pdrop > 0  # dropout is on, so the random state matters
    for (one, _, after_one), (two, _, after_two) in zip(first, second, strict=True):
        assert after_one.snapshots[-1].allclose(after_two.snapshots[-1], rtol=0, atol=0)
        assert one.fed_sync.losses == two.fed_sync.losses


def test_the_loss_sent_at_a_sync_is_the_mean_over_that_round(tmp_path):
    pairs = run_pair(tmp_path, "l", FedArguments("step", 3))  # 6 steps: syncs after steps 3 and 6
    client = pairs[0][0]
    logged = [e["loss"] for e in client.state.log_history if "loss" in e]  # logging_steps=1
    assert len(logged) == 6
    expected = [sum(logged[:3]) / 3, sum(logged[3:]) / 3]
    assert client.fed_sync.losses == pytest.approx(expected, abs=2e-4)  # the Trainer logs 4 decimals


def test_parties_with_different_architectures_are_named_in_process_and_over_grpc(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2, timeout=60)
    a, *_ = make_client(fed.context(0), csvs[0], 0, FedArguments(), tmp_path / "a", model=tiny_gpt2(0, n_embd=32))
    b, *_ = make_client(fed.context(1), csvs[1], 1, FedArguments(), tmp_path / "b", model=tiny_gpt2(1, n_embd=16))
    error_a, error_b = train_all([a, b])
    assert isinstance(error_b, ConfigError)
    assert "party-1's model has another param layout than party-0's" in str(error_b)
    assert "transformer.wte.weight is [50257, 16] float32, expected [50257, 32]" in str(error_b)
    assert "party-1 left after 0 of" in str(error_a)  # party 0 is told, not left waiting

    parties = [("guest", "1"), ("host", "2"), ("arbiter", "3")]
    address = f"127.0.0.1:{free_port()}"
    ctxs = [create_context(p, parties, "s-arch", address, insecure=True) for p in parties]
    server = FedAvgServer(ctxs[2], wait_timeout=8)  # then it gives up on the refused host
    ended = []
    threading.Thread(target=lambda: ended.append(train_all([server], join_s=60)), daemon=True).start()
    guest, *_ = make_client(ctxs[0], csvs[0], 0, FedArguments(), tmp_path / "g", model=tiny_gpt2(0, n_embd=32))
    host, *_ = make_client(ctxs[1], csvs[1], 1, FedArguments(), tmp_path / "h", model=tiny_gpt2(1, n_embd=16))
    guest_error = []
    guest_thread = threading.Thread(target=lambda: guest_error.extend(train_all([guest], join_s=60)), daemon=True)
    guest_thread.start()  # first: its layout becomes the session's
    time.sleep(1.0)
    (error_host,) = train_all([host], join_s=60)
    assert error_host is not None
    assert "another param layout than the session's" in str(error_host)
    assert "transformer.wte.weight is [50257, 16] float32, expected [50257, 32]" in str(error_host)
    guest_thread.join(60)
    deadline = time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "missing host-2" in str(ended[0][0])  # the arbiter gave up on the refused party ...
    assert isinstance(guest_error[0], SessionFailed)  # ... and told the guest why, instead of leaving it waiting
    assert "missing host-2" in str(guest_error[0])
