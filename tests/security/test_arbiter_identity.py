"""Parties verify the arbiter: only the certificate named ``arbiter``, signed by the job's CA, passes for it,
whatever address a party dials. Real certificates from fedfleet.security, real gRPC servers on loopback, mutual TLS.

The attack: a party of the job (here alice) starts a gRPC server with its own key and certificate at the job's
address; an honest party must not open its stream there (it would join and send its updates)."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfleet.cli.certs import add_certs_parser
from fedfleet.core.params import FlatParams
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import ArbiterServer, Connection, PartyRejected, tls
from fedfleet.runtime.grpc.party import PartySession
from fedfleet.runtime.grpc.tls import channel_credentials, server_credentials
from fedfleet.security import CertificateError, certs, describe, init_ca, issue
from tests.grpc_jobs import free_port

PARTIES = ["guest-9999", "host-10000"]
SPEC = FlatParams.from_tensors({"w": torch.zeros(3)}).spec
HOSTS = ["localhost", "127.0.0.1", "::1"]
BOTH = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """The job's CA, the arbiter, two honest parties and alice, a party that turns rogue."""
    init_ca(tmp_path)
    for name in ["arbiter", *PARTIES, "alice"]:
        issue(tmp_path, name)
    return tmp_path


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sign_like_before(pki: Path, name: str, sans: list[str]) -> None:
    """A certificate made as fedfleet made them before parties checked the arbiter's name (both usages,
    the hosts as SANs), or by another tool: signed by the job's own CA, so the chain verifies."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca = _cert(pki / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(BOTH), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.PrivateFormat.PKCS8
    (pki / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, pem, serialization.NoEncryption()))
    (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class _Recorder(grpc.GenericRpcHandler):
    """Answers nothing; records every call that got through the TLS handshake (a party's stream, its Join)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.calls.append(handler_call_details.method)
        return None


@contextmanager
def raw_server(pki: Path, name: str, bind: str = "127.0.0.1") -> Iterator[tuple[int, _Recorder]]:
    """A gRPC server with mutual TLS that serves ``name``'s key and certificate as they are, as anyone holding
    them could (``grpc.ssl_server_credentials``, no fedfleet check in between)."""
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((recorder,))
    pair = ((pki / f"{name}.key").read_bytes(), (pki / f"{name}.crt").read_bytes())
    creds = grpc.ssl_server_credentials(
        [pair], root_certificates=(pki / "ca.crt").read_bytes(), require_client_auth=True
    )
    port = server.add_secure_port(f"{bind}:0", creds)
    server.start()
    try:
        yield port, recorder
    finally:
        server.stop(grace=None)


@contextmanager
def arbiter(pki: Path, bind: str = "127.0.0.1") -> Iterator[int]:
    """The real arbiter server with the credentials the arbiter loads (``server_credentials``)."""
    port = free_port()
    server = ArbiterServer(
        session="s", parties=PARTIES, spec=SPEC, address=f"{bind}:{port}", credentials=server_credentials(pki)
    )
    server.start()
    try:
        yield port
    finally:
        server.stop(0.5)


def honest_party(pki: Path, address: str, session: str = "s", name: str = "guest-9999") -> PartySession:
    conn = Connection(address, session, name, channel_credentials(pki, name), max_attempts=2, reconnect_max_s=0.1)
    return PartySession(SPEC, conn)


def reaches_the_arbiter(pki: Path, address: str) -> None:
    """The party's stream got through TLS to the real arbiter, which answered (a refusal: wrong session)."""
    with pytest.raises(PartyRejected, match="session"):
        honest_party(pki, address, session="another-session").run()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("rogue", ["as issued", "issued with --server", "as issued before"])
def test_a_party_certificate_cannot_pose_as_the_arbiter(pki: Path, host: str, rogue: str) -> None:
    if rogue == "issued with --server":  # serverAuth and the hosts: only the arbiter's name keeps it out
        issue(pki, "alice", server=True, overwrite=True)
    elif rogue == "as issued before":  # both usages, localhost, 127.0.0.1, ::1 and its own name
        _sign_like_before(pki, "alice", [*HOSTS, "alice"])
    with raw_server(pki, "alice") as (port, rogue_server):
        with pytest.raises(ConnectionError, match=r"cannot reach the arbiter.*issued as 'arbiter'"):
            honest_party(pki, f"{host}:{port}").run()
        assert rogue_server.calls == []  # the handshake failed: no stream, no Join, no update reached alice


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_arbiter_certificate_serves_at_loopback_addresses(pki: Path, host: str) -> None:
    with arbiter(pki) as port:
        reaches_the_arbiter(pki, f"{host}:{port}")


def test_the_arbiter_is_checked_by_name_not_by_the_address_dialled(pki: Path) -> None:
    """An arbiter on a compute node is dialled at whatever name or IP the job file gives; its certificate need
    not list it, and a rogue's certificate passes at no address."""
    hostname = socket.gethostname()
    try:
        socket.getaddrinfo(hostname, None, socket.AF_INET)
    except OSError:
        pytest.skip(f"this machine's hostname {hostname!r} does not resolve")
    assert hostname not in {"localhost", "arbiter"}
    with arbiter(pki, bind="0.0.0.0") as port:
        reaches_the_arbiter(pki, f"{hostname}:{port}")
    issue(pki, "alice", server=True, hosts=[hostname], overwrite=True)  # even one valid for that very name
    with raw_server(pki, "alice", bind="0.0.0.0") as (port, rogue_server):
        with pytest.raises(ConnectionError):
            honest_party(pki, f"{hostname}:{port}").run()
        assert rogue_server.calls == []


def test_an_arbiter_certificate_without_the_name_is_refused_with_the_fix(
    pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both usages, SANs localhost, 127.0.0.1, ::1 but no DNS:arbiter (another tool made it): parties would refuse
    it, so the arbiter does not start with it, and says how to fix it; `certs list` flags it."""
    _sign_like_before(pki, "arbiter", HOSTS)
    with pytest.raises(ConfigError, match=rf"no DNS:arbiter.*`fedfleet certs issue {pki} arbiter --overwrite`"):
        server_credentials(pki)
    with raw_server(pki, "arbiter") as (port, server):  # served anyway, without the check: the party refuses it
        with pytest.raises(ConnectionError):
            honest_party(pki, f"127.0.0.1:{port}").run()
        assert server.calls == []
    parser = argparse.ArgumentParser(prog="fedfleet")
    add_certs_parser(parser.add_subparsers())
    args = parser.parse_args(["certs", "list", str(pki)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines if "PROBLEM" in line] == ["CN=arbiter"]  # the parties' are fine
    (line,) = [line for line in lines if "CN=arbiter" in line]
    assert f"PROBLEM: {pki / 'arbiter.crt'} is not valid for the name 'arbiter'" in line
    assert f"`fedfleet certs issue {pki} arbiter --overwrite`" in line

    issue(pki, "arbiter", overwrite=True)  # the fix the message names; parties keep their certificates
    assert args.func(args) == 0
    assert "PROBLEM" not in capsys.readouterr().out
    with arbiter(pki) as port:
        reaches_the_arbiter(pki, f"127.0.0.1:{port}")


def test_a_party_certificate_as_the_arbiters_is_refused(pki: Path) -> None:
    (pki / "arbiter.key").write_bytes((pki / "alice.key").read_bytes())
    (pki / "arbiter.crt").write_bytes((pki / "alice.crt").read_bytes())
    with pytest.raises(ConfigError, match=r"not a TLS server certificate.*certs issue .* arbiter --overwrite"):
        server_credentials(pki)


def test_an_arbiter_certificate_fedfleet_issued_before_still_serves(pki: Path) -> None:
    """Before, fedfleet gave the arbiter both usages and its name as a DNS SAN: parties accept that one."""
    _sign_like_before(pki, "arbiter", [*HOSTS, "arbiter"])
    with arbiter(pki) as port:
        reaches_the_arbiter(pki, f"localhost:{port}")


def test_the_arbiter_certificate_cannot_join_as_a_party(pki: Path) -> None:
    """The name arbiter is only ever the arbiter: its certificate is a server's, which TLS refuses from a client."""
    with arbiter(pki) as port, pytest.raises(ConnectionError):
        honest_party(pki, f"127.0.0.1:{port}", name="arbiter").run()


def test_certificate_profiles(pki: Path) -> None:
    arb = _cert(pki / "arbiter.crt")
    assert list(arb.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = arb.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "arbiter"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    for name in [*PARTIES, "alice"]:
        cert = _cert(pki / f"{name}.crt")
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        with pytest.raises(x509.ExtensionNotFound):  # no host names: a party only dials
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    uses = {row["name"]: row["uses"] for row in describe(pki)}
    assert uses == {"alice": "client", "arbiter": "server", "ca": "ca", "guest-9999": "client", "host-10000": "client"}

    _, crt = issue(pki, "alice", server=True, hosts=["alice.example.org", "10.0.0.7"], overwrite=True)
    cert = _cert(crt)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == BOTH
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alice.example.org", "alice"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    _, crt = issue(pki, "arbiter", server=True, hosts=["10.0.0.5"], overwrite=True)  # server=True: the default
    san = _cert(crt).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["arbiter"]


def test_certs_list_flags_another_certificate_that_would_pass_for_the_arbiter(
    pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _sign_like_before(pki, "alice", ["localhost", "arbiter"])  # made with another tool, say
    parser = argparse.ArgumentParser(prog="fedfleet")
    add_certs_parser(parser.add_subparsers())
    args = parser.parse_args(["certs", "list", str(pki)])
    assert args.func(args) == 0
    flagged = [line for line in capsys.readouterr().out.splitlines() if "PROBLEM" in line]
    assert len(flagged) == 1 and "CN=alice" in flagged[0] and "would pass for the arbiter" in flagged[0]


def test_the_name_parties_pin_is_the_name_certs_issue_serves() -> None:
    assert certs.ARBITER_NAME == tls.ARBITER_NAME == "arbiter"
    assert tls.ARBITER_CHANNEL_OPTIONS == (("grpc.ssl_target_name_override", "arbiter"),)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("arbiter", {"server": False}, "always a server certificate"),
        ("Arbiter", {}, "would match the arbiter's name"),
        ("ARBITER.", {"server": True}, "would match the arbiter's name"),
        ("arbiter.", {}, "would match the arbiter's name"),
        ("alice", {"server": True, "hosts": ["localhost", "Arbiter."]}, "only the certificate named 'arbiter'"),
        ("alice", {"hosts": ["alice.example.org"]}, "add --server"),
    ],
)
def test_no_other_certificate_can_carry_the_arbiters_name(pki: Path, name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        issue(pki, name, overwrite=True, **kwargs)


def test_cli_issue_server_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedfleet")
    add_certs_parser(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.func(args)

    d = tmp_path / "certs"
    assert run("certs", "init", str(d)) == 0
    with pytest.raises(CertificateError, match="add --server"):
        run("certs", "issue", str(d), "guest-9999", "--host", "10.0.0.7")
    assert not (d / "guest-9999.crt").exists()
    assert run("certs", "issue", str(d), "guest-9999", "--server", "--host", "10.0.0.7") == 0
    assert run("certs", "issue", str(d), "host-10000") == 0
    assert run("certs", "issue", str(d), "arbiter", "--server") == 0
    capsys.readouterr()
    assert run("certs", "list", str(d)) == 0
    uses = [line.split("\t")[-1] for line in capsys.readouterr().out.splitlines()]
    assert uses == ["use=server", "use=ca", "use=client+server", "use=client"]
    with pytest.raises(SystemExit):
        parser.parse_args(["certs", "issue", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # the help explains both kinds of certificate
    assert "--server" in text and "for the DNS name arbiter" in text and "a TLS client certificate" in text
    assert "`fedfleet certs issue DIR arbiter --overwrite`" in text
