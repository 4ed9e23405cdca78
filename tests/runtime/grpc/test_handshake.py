"""TLS set-ups that cannot work stop the party at once with what is wrong, instead of redialling for minutes."""

import shutil
import time

import pytest
import torch

from fedfleet.core.params import FlatParams
from fedfleet.runtime.grpc import ArbiterServer, Connection
from fedfleet.runtime.grpc.handshake import HandshakeFailed
from fedfleet.runtime.grpc.party import PartySession
from fedfleet.runtime.grpc.tls import channel_credentials, server_credentials
from fedfleet.security import init_ca, issue
from tests.grpc_jobs import free_port

SPEC = FlatParams.from_tensors({"w": torch.zeros(3)}).spec


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The job's certificate folder, another CA's, and one holding the job's CA with the other CA's party."""
    job, other, mixed = (tmp_path_factory.mktemp(n) for n in ("job", "other", "mixed"))
    for folder in (job, other):
        init_ca(folder)
        issue(folder, "arbiter")
        issue(folder, "guest")
    shutil.copy(job / "ca.crt", mixed / "ca.crt")
    for name in ("guest.crt", "guest.key"):
        shutil.copy(other / name, mixed / name)
    return {"job": job, "other": other, "mixed": mixed}


def dial(server_certs, party_creds):
    """A party dialling an arbiter (mTLS from ``server_certs``, or plaintext): the error and the seconds taken."""
    port = free_port()
    credentials = server_credentials(server_certs) if server_certs else None
    server = ArbiterServer(
        session="s", parties=["guest"], spec=SPEC, address=f"127.0.0.1:{port}", credentials=credentials
    )
    server.start()
    party = PartySession(SPEC, Connection(f"127.0.0.1:{port}", "s", "guest", party_creds, reconnect_max_s=0.2))
    start = time.monotonic()
    try:
        with pytest.raises(HandshakeFailed) as caught:
            party.run()
        return str(caught.value), time.monotonic() - start
    finally:
        server.stop(0.1)


@pytest.mark.parametrize(
    "server, party, words",
    [
        ("job", "other", "not signed by the CA in this party's certificate folder"),
        (None, "job", "speaks plaintext"),
        ("job", None, "closed the connection during the TLS handshake 5 times"),
        ("job", "mixed", "closed the connection during the TLS handshake 5 times"),
    ],
    ids=["arbiter-of-another-CA", "plaintext-arbiter", "plaintext-party", "party-of-another-CA"],
)
def test_a_handshake_that_cannot_work_stops_the_party_with_the_fix(folders, server, party, words):
    creds = channel_credentials(folders[party], "guest") if party else None
    message, took = dial(folders[server] if server else None, creds)
    assert words in message
    assert took < 15  # it redialled for about 9 minutes before
