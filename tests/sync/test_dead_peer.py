"""A party whose peer is dead does not wait forever: a dead arbiter ends it after give_up_s, a dead party ends the
session after wait_timeout, and the parties still connected are told whom the round waits for."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fedfleet.errors import ConfigError
from fedfleet.hf import create_context
from fedfleet.runtime.grpc import Connection, PartyRejected, SessionFailed, SyncParty
from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from fedfleet.sync.local import LocalFederation
from tests.grpc_jobs import free_port
from tests.paths import ROOT
from tests.sync.test_sync_session import NAMES, TrainingParty, run_session, tiny_model


def test_a_party_stops_once_the_arbiter_has_been_out_of_reach_for_give_up_s():
    from fedfleet.core.params import bind_module

    params = bind_module(tiny_model(0))
    address = f"127.0.0.1:{free_port()}"  # nobody listens: an arbiter that is down, or a wrong address
    connection = Connection(address, "s1", NAMES[0], None, heartbeat_s=0.5, reconnect_max_s=0.5, give_up_s=2.0)
    party = SyncParty(params.spec, connection, rounds=1)
    began = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"arbiter at {address} has been out of reach for 2 s"):
        party.start(params, timeout=60)
    assert time.monotonic() - began < 10
    party.close()


def test_create_context_takes_the_give_up_time_and_refuses_a_bad_one():
    parties = [("guest", "1"), ("arbiter", "2")]
    assert create_context(parties[0], parties, "s", insecure=True).give_up_s == 600.0
    assert create_context(parties[0], parties, "s", insecure=True, give_up_s=None).give_up_s is None
    with pytest.raises(ConfigError, match="give_up_s must be > 0"):
        create_context(parties[0], parties, "s", insecure=True, give_up_s=0)


PARTY_B = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.sync.test_sync_session import TrainingParty
party = TrainingParty({address!r}, {name!r}, 1, rounds=50)
party.ctx.start(party.params)
for _ in range(2):
    party.ctx.sync(party.params, party.weight, {{}})
print("synced", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_party_killed_mid_session_is_named_to_the_others_and_the_session_ends_at_wait_timeout():
    address = f"127.0.0.1:{free_port()}"
    arbiter = SyncArbiter(SyncSessionConfig(session="s1", parties=NAMES, address=address, certs=None, wait_timeout=13))
    outcome: dict = {}

    def serve():
        try:
            arbiter.serve()
        except BaseException as exc:
            outcome["arbiter"] = exc

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    survivor = TrainingParty(address, NAMES[0], 0, rounds=50)
    trainer = threading.Thread(target=survivor.run, daemon=True)
    trainer.start()
    assert arbiter.server.spec_known.wait(30)
    code = textwrap.dedent(PARTY_B).format(repo=str(ROOT), address=address, name=NAMES[1])
    doomed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert doomed.stdout.readline().strip() == "synced"
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    killed = time.monotonic()
    trainer.join(60)
    assert not trainer.is_alive(), "the surviving party still waits for the dead one"
    assert time.monotonic() - killed < 30
    assert isinstance(survivor.error, SessionFailed)
    assert "missing host-10000" in str(survivor.error) and "13 s" in str(survivor.error)
    assert "waits for host-10000" in survivor.ctx.notice  # told while it waited, not only at the end
    server.join(30)
    assert "host-10000" in str(outcome["arbiter"])


def test_a_party_whose_token_ids_mean_other_tokens_is_refused_by_name():
    parties = [TrainingParty("", name, seed, rounds=2) for seed, name in enumerate(NAMES)]
    parties[0].ctx.vocab, parties[1].ctx.vocab = "a" * 64, "b" * 64
    _, parties, _ = run_session(rounds=2, parties=parties, join_timeout=2)
    assert isinstance(parties[1].error, PartyRejected)
    assert "host-10000's tokenizer gives token ids other meanings than guest-9999's" in str(parties[1].error)
    # the other party is not left waiting an hour for a party that was refused
    assert isinstance(parties[0].error, SessionFailed)
    assert "only 1 may take part: the arbiter refused host-10000: host-10000's tokenizer" in str(parties[0].error)


def test_parties_with_one_vocabulary_or_none_run():
    parties = [TrainingParty("", name, seed, rounds=2) for seed, name in enumerate(NAMES)]
    parties[0].ctx.vocab = "a" * 64  # the other sends none (no tokenizer): nothing to compare
    _, parties, result = run_session(rounds=2, parties=parties)
    assert [p.error for p in parties] == [None, None] and len(result["history"]) == 2


def test_in_process_parties_are_checked_alike():
    from fedfleet.core.params import bind_module

    fed = LocalFederation(2, timeout=30)
    errors: dict[int, BaseException | None] = {}

    def run(index: int, vocab: str) -> None:
        params = bind_module(tiny_model(0))
        channel = fed.context(index).channel(params.spec, 1, vocab=vocab)
        try:
            channel.start(params)
            channel.sync(params, 1.0)
            errors[index] = None
        except BaseException as exc:
            errors[index] = exc
        finally:
            channel.close()

    threads = [threading.Thread(target=run, args=(i, v), daemon=True) for i, v in enumerate(["a" * 64, "c" * 64])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert isinstance(errors[1], ConfigError) and "party-1's tokenizer gives token ids other meanings" in str(errors[1])
    assert errors[0] is not None  # party-0 is not left waiting for a party that cannot join
