"""A real party of a secure session against a malicious arbiter: a fake server over mutual TLS that scripts every
message, plays the party's three neighbours with real protocol state, and tries what an honest arbiter never would.
"""

import dataclasses
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from fedfleet.config import load_job
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.jobs.deploy import Access, build_party
from fedfleet.runtime.grpc import secure_wire as sw
from fedfleet.runtime.grpc.chunks import ParamsReceiver, iter_chunks
from fedfleet.runtime.grpc.secure_identity import Signer
from fedfleet.runtime.grpc.service import add_handler, server_options
from fedfleet.runtime.grpc.tls import server_credentials
from fedfleet.runtime.grpc.wire import (
    Chunk,
    Done,
    Failure,
    Heartbeat,
    Join,
    Result,
    SecAggAdvert,
    SecAggInbox,
    SecAggReply,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    Task,
    TaskKind,
    Welcome,
)
from fedfleet.secagg import SecAggConfig, SecAggParty, SecAggServer
from fedfleet.secagg.messages import Advertise, UnmaskRequest
from tests.grpc_jobs import free_port
from tests.runtime.grpc.secure_helpers import FOUR, PARTIES4, secure_job

ME = PARTIES4[0]
CONFIG = SecAggConfig(clip=1.0, bits=16)


class FakeArbiter:
    """Speaks the wire protocol by hand to the one party that dials it: the test sends and receives each message."""

    def __init__(self, certs, port: int) -> None:
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4), options=server_options())
        add_handler(self.server, self._connect)
        self.server.add_secure_port(f"127.0.0.1:{port}", server_credentials(certs))
        self.received: queue.Queue = queue.Queue()
        self.to_party: queue.Queue = queue.Queue()
        self.server.start()

    def _connect(self, requests, context):
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()
        while (item := self.to_party.get()) is not None:
            yield from item if isinstance(item, list) else [item]

    def _read(self, requests) -> None:
        try:
            for msg in requests:
                self.received.put(msg)
        except grpc.RpcError:
            pass  # the party left

    def send(self, item) -> None:
        self.to_party.put(item)

    def receive(self, kind, timeout: float = 30.0):
        """The party's next message other than a heartbeat, which must be a ``kind``."""
        while isinstance(msg := self.received.get(timeout=timeout), Heartbeat):
            pass
        assert isinstance(msg, kind), msg
        return msg

    def stop(self) -> None:
        self.send(Done(reason="over"))
        self.send(None)
        self.server.stop(0.5)


@pytest.fixture
def session(tmp_path):
    """A real party (``build_party`` of the four-party job) dialling a fake arbiter; yields (arbiter, party, job)."""
    port = free_port()
    job = load_job(secure_job(tmp_path), [*FOUR, f"network.address=127.0.0.1:{port}"])
    party = build_party(job, ME, Access(False, str(tmp_path / "certs"), job.network.address))
    arbiter = FakeArbiter(tmp_path / "certs", port)
    thread = threading.Thread(target=party.run, daemon=True)
    thread.start()
    join = arbiter.receive(Join)
    assert join.secure_aggregation == sw.config_values(CONFIG)
    arbiter.send(Welcome(name=ME, index=0, round=0))
    yield arbiter, party, job
    arbiter.stop()
    thread.join(10)


class Neighbours:
    """The party's three neighbours (ids 2-4) and the server's bookkeeping, played for real by the fake arbiter."""

    def __init__(self, job, certs, session: str = "test-session") -> None:
        self.session, self.certs = session, certs
        self.plan = CONFIG.validate(4)
        self.peers = {j: SecAggParty(j, session, 0, CONFIG, self.plan) for j in (2, 3, 4)}
        self.server = SecAggServer(session, 0, CONFIG, [1, 2, 3, 4], graph_seed=7)
        self.signed = {}
        for j, peer in self.peers.items():
            advert = peer.advertise()
            self.server.receive_advert(advert)
            self.signed[j] = Signer(certs, PARTIES4[j - 1]).sign(session, 0, j, advert.cipher_pk, advert.mask_pk)


HEADER = {"task_id": "t1", "round": 0, "session": "test-session", "party": 1}


def set_up_and_share(arbiter, party, job, certs, forge=None):
    """Setup, advert, roster (changed by ``forge``), shares, inbox, fit task: returns the neighbours and the party's
    answer to the roster (its shares, or its refusal)."""
    arbiter.send(SecAggSetup(**HEADER, n=4, config=sw.config_values(CONFIG), graph_seed=7))
    advert = arbiter.receive(SecAggAdvert)
    peers = Neighbours(job, certs)
    peers.server.receive_advert(Advertise("test-session", 0, 1, bytes.fromhex(advert.cipher_pk),
                                          bytes.fromhex(advert.mask_pk)))  # fmt: skip
    rosters = peers.server.rosters()
    roster, signed = rosters[1], dict(peers.signed)
    if forge is not None:
        roster, signed = forge(roster, signed)
    arbiter.send(SecAggRoster(**HEADER, payload=sw.encode_roster(roster, signed)))
    return peers, rosters, arbiter.received.get(timeout=30)


def inbox_for_the_party(peers, rosters, answer):
    """The party's shares (its ``answer`` to the roster) and its neighbours' in; the party's inbox out."""
    peers.server.receive_shares(1, sw.decode_shares(answer.payload, "test-session", 0, 1, 4, 3))
    for j, peer in peers.peers.items():
        peers.server.receive_shares(j, peer.share_keys(rosters[j]))
    return peers.server.inboxes()[1]


def test_a_party_never_reveals_both_kinds_of_share_of_one_peer_whatever_the_arbiter_asks(session, tmp_path):
    arbiter, party, job = session
    peers, rosters, answer = set_up_and_share(arbiter, party, job, tmp_path / "certs")
    assert isinstance(answer, SecAggShares), answer
    inbox = inbox_for_the_party(peers, rosters, answer)
    arbiter.send(SecAggInbox(**HEADER, payload=sw.encode_shares(inbox, by_sender=True)))
    arbiter.send(Task(task_id="t1", round=0, task=TaskKind.FIT, config=dataclasses.asdict(FitConfig(epochs=1))))
    arbiter.send(list(iter_chunks(FlatParams.zeros(party.spec))))

    header = arbiter.receive(Result)
    assert (header.secagg_party, header.session) == (1, "test-session")
    masked = FlatParams.zeros(sw.masked_spec(party.spec.numel, 32))
    receiver = ParamsReceiver(masked)
    while not receiver.complete:
        receiver.add(arbiter.receive(Chunk))

    # an honest request: 2 and 3 alive, 4 dropped
    request = UnmaskRequest("test-session", 0, 1, frozenset({1, 2, 3}), frozenset({4}))
    arbiter.send(SecAggUnmask(**HEADER, payload=sw.encode_request(request)))
    reply = sw.decode_reply(arbiter.receive(SecAggReply).payload, "test-session", 0, 1, 4, 3)
    assert set(reply.self_shares) == {2, 3} and set(reply.key_shares) == {4}

    # then the opposite story, to collect the other kind of share of every neighbour: refused, nothing revealed
    liar = UnmaskRequest("test-session", 0, 1, frozenset({1, 4}), frozenset({2, 3}))
    arbiter.send(SecAggUnmask(**HEADER, payload=sw.encode_request(liar)))
    refusal = arbiter.receive(Failure)
    assert "refuses to reveal the second kind of share of [2, 3, 4]" in refusal.reason
    # and one neighbour at a time: 4 said alive after its key share went out
    arbiter.send(SecAggUnmask(**HEADER, payload=sw.encode_request(
        UnmaskRequest("test-session", 0, 1, frozenset({1, 2, 3, 4}), frozenset()))))  # fmt: skip
    assert "second kind of share of [4]" in arbiter.receive(Failure).reason


def test_a_roster_with_keys_the_arbiter_swapped_in_is_refused(session, tmp_path):
    """The arbiter puts its own key in place of neighbour 2's (signed with its own certificate, or not at all):
    the party sends no shares, so the arbiter learns nothing it could unmask with."""
    arbiter, party, job = session
    fake = SecAggParty(2, "test-session", 0, CONFIG, CONFIG.validate(4)).advertise()

    def swap(roster, signed):
        cipher = {**roster.cipher_pks, 2: fake.cipher_pk}
        return dataclasses.replace(roster, cipher_pks=cipher), signed

    _, _, answer = set_up_and_share(arbiter, party, job, tmp_path / "certs", forge=swap)
    assert isinstance(answer, Failure) and "keys of party 2 are not bound to a party" in answer.reason

    def unsigned(roster, signed):
        return roster, {**signed, 3: sw.Signed()}

    _, _, answer = set_up_and_share(arbiter, party, job, tmp_path / "certs", forge=unsigned)
    assert isinstance(answer, Failure) and "the advert is not signed" in answer.reason


def test_a_party_sends_no_plain_update_and_accepts_no_weaker_settings(session):
    arbiter, party, _ = session
    arbiter.send(Task(task_id="t0", round=0, task=TaskKind.FIT, config=dataclasses.asdict(FitConfig(epochs=1))))
    arbiter.send(list(iter_chunks(FlatParams.zeros(party.spec))))
    assert "answers only the fit task of a secure round" in arbiter.receive(Failure).reason
    weaker = sw.config_values(dataclasses.replace(CONFIG, neighbours=1, threshold=1))
    arbiter.send(SecAggSetup(**HEADER, n=4, config=weaker, graph_seed=7))
    assert "the arbiter asks for secure aggregation" in arbiter.receive(Failure).reason
    arbiter.send(SecAggSetup(**{**HEADER, "session": "another"}, n=4, config=sw.config_values(CONFIG)))
    assert "for session 'another'" in arbiter.receive(Failure).reason


@pytest.mark.parametrize("ahead", [True, False], ids=["masks-made-ahead", "masks-made-at-fit"])
def test_an_inbox_that_fails_its_tag_withdraws_the_party_and_no_masked_input_goes(
    session, tmp_path, monkeypatch, ahead
):
    arbiter, party, job = session
    prepared = []
    prepare_masks = SecAggParty.prepare_masks
    monkeypatch.setattr(
        SecAggParty, "prepare_masks", lambda self, *a, **k: prepared.append(1) or prepare_masks(self, *a, **k)
    )
    party.secure.prepare_masks = ahead
    party.secure._length = party.spec.numel  # as after a first round: the masks are made once the inbox is in
    peers, rosters, answer = set_up_and_share(arbiter, party, job, tmp_path / "certs")
    inbox = inbox_for_the_party(peers, rosters, answer)
    forged = [dataclasses.replace(inbox[0], ciphertext=bytes(len(inbox[0].ciphertext))), *inbox[1:]]
    arbiter.send(SecAggInbox(**HEADER, payload=sw.encode_shares(forged, by_sender=True)))
    arbiter.send(Task(task_id="t1", round=0, task=TaskKind.FIT, config=dataclasses.asdict(FitConfig(epochs=1))))
    arbiter.send(list(iter_chunks(FlatParams.zeros(party.spec))))
    refusal = arbiter.receive(Failure)
    assert refusal.reason == "secure aggregation: a sealed message failed its AES-GCM tag check"
    assert len(prepared) == int(ahead)
    time.sleep(1.0)  # and nothing after the refusal: no Result, no chunk
    while not arbiter.received.empty():
        assert isinstance(arbiter.received.get(), Heartbeat)


def test_a_second_inbox_for_one_round_is_refused_and_the_first_one_counts(session, tmp_path):
    arbiter, party, job = session
    party.secure._length = party.spec.numel  # the masks are in the making when the second inbox comes
    peers, rosters, answer = set_up_and_share(arbiter, party, job, tmp_path / "certs")
    inbox = inbox_for_the_party(peers, rosters, answer)
    arbiter.send(SecAggInbox(**HEADER, payload=sw.encode_shares(inbox, by_sender=True)))
    arbiter.send(SecAggInbox(**HEADER, payload=sw.encode_shares(inbox[:1], by_sender=True)))
    assert "a second inbox for this round" in arbiter.receive(Failure).reason
    arbiter.send(Task(task_id="t1", round=0, task=TaskKind.FIT, config=dataclasses.asdict(FitConfig(epochs=1))))
    arbiter.send(list(iter_chunks(FlatParams.zeros(party.spec))))
    header = arbiter.receive(Result)
    assert header.secagg_party == 1
