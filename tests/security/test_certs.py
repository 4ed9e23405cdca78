"""Certificates for mutual TLS: real keys, real signatures, a real gRPC handshake on loopback."""

from __future__ import annotations

import argparse
import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfleet.cli.certs import add_certs_parser
from fedfleet.errors import UserError
from fedfleet.security import CertificateError, describe, init_ca, issue, load_identity

PARTIES = ("arbiter", "guest-9999", "host-10000")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA and three parties, as `fedfleet certs init` + `issue` would leave them."""
    init_ca(tmp_path)
    for name in PARTIES:
        issue(tmp_path, name)
    return tmp_path


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_is_a_self_signed_ca(pki: Path) -> None:
    ca = _cert(pki / "ca.crt")
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fedfleet-ca"
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ca.public_key().verify(ca.signature, ca.tbs_certificate_bytes, ec.ECDSA(ca.signature_hash_algorithm))


@pytest.mark.parametrize("name", PARTIES)
def test_party_cert_is_signed_by_the_ca(pki: Path, name: str) -> None:
    ca, cert = _cert(pki / "ca.crt"), _cert(pki / f"{name}.crt")
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca.subject
    assert load_identity(pki / f"{name}.crt") == name
    # the arbiter's is a server certificate, the parties' client certificates (test_arbiter_identity.py)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH if name == "arbiter" else ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_keys_are_private(pki: Path) -> None:
    for key in ["ca.key", *(f"{n}.key" for n in PARTIES)]:
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600, key
    assert not list(pki.glob(".*.tmp"))


def test_custom_hosts_and_non_dns_name(tmp_path: Path) -> None:
    init_ca(tmp_path)
    _, crt = issue(tmp_path, "guest_1", hosts=["arbiter.example.org", "10.0.0.5"], server=True)
    cert = _cert(crt)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["arbiter.example.org"]  # guest_1 is no DNS name
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    ]


def test_refuses_to_overwrite(pki: Path) -> None:
    ca_before = (pki / "ca.key").read_bytes()
    with pytest.raises(CertificateError, match=r"ca\.key.*--overwrite"):
        init_ca(pki)
    with pytest.raises(CertificateError, match=r"guest-9999\.key.*--overwrite"):
        issue(pki, "guest-9999")
    assert (pki / "ca.key").read_bytes() == ca_before
    key_before = (pki / "guest-9999.key").read_bytes()
    issue(pki, "guest-9999", overwrite=True)
    assert (pki / "guest-9999.key").read_bytes() != key_before
    assert stat.S_IMODE((pki / "guest-9999.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "-guest", "guest 1", "../evil", "a" * 65, "ca"])
def test_bad_name(pki: Path, name: str) -> None:
    with pytest.raises(UserError, match="name"):
        issue(pki, name)


def test_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"fedfleet certs init .* first"):
        issue(tmp_path, "guest-9999")
    assert not list(tmp_path.iterdir())


def test_describe(pki: Path) -> None:
    rows = {row["name"]: row for row in describe(pki)}
    assert sorted(rows) == sorted(["ca", *PARTIES])
    assert rows["guest-9999"]["cn"] == "guest-9999"
    assert rows["guest-9999"]["issuer"] == "fedfleet-ca"
    assert rows["guest-9999"]["not_after"] <= rows["ca"]["not_after"]


@pytest.fixture
def echo_server(pki: Path) -> Iterator[int]:
    """A gRPC server that requires a client certificate and answers with the caller's CN."""

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return context.auth_context()["x509_common_name"][0]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"Echo": handler}),))
    creds = grpc.ssl_server_credentials(
        [((pki / "arbiter.key").read_bytes(), (pki / "arbiter.crt").read_bytes())],
        root_certificates=(pki / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _call(port: int, ca: Path, key: Path, cert: Path) -> bytes:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        return channel.unary_unary("/t.T/Echo")(b"", timeout=10)


def test_mutual_tls_handshake(pki: Path, echo_server: int) -> None:
    assert _call(echo_server, pki / "ca.crt", pki / "guest-9999.key", pki / "guest-9999.crt") == b"guest-9999"


def test_client_from_another_ca_is_refused(
    pki: Path, echo_server: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    init_ca(other, name="other-ca")
    key, crt = issue(other, "guest-9999")  # same name, wrong CA: the name alone must not get in
    with pytest.raises(grpc.RpcError):
        _call(echo_server, pki / "ca.crt", key, crt)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedfleet")
    add_certs_parser(parser.add_subparsers())

    def run(*argv: str) -> list[str]:
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        return capsys.readouterr().out.splitlines()

    d = tmp_path / "certs"
    assert run("certs", "init", str(d), "--days", "30") == [str(d / "ca.key"), str(d / "ca.crt")]
    out = run("certs", "issue", str(d), "arbiter", "--host", "arbiter.example.org", "--host", "10.0.0.5")
    assert out == [str(d / "arbiter.key"), str(d / "arbiter.crt")]
    san = _cert(d / "arbiter.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["arbiter.example.org", "arbiter"]
    run("certs", "issue", str(d), "guest-9999")
    listing = run("certs", "list", str(d))
    assert [line.split("\t")[1] for line in listing] == ["CN=arbiter", "CN=fedfleet-ca", "CN=guest-9999"]
    args = parser.parse_args(["certs", "init", str(d)])
    with pytest.raises(UserError, match="--overwrite"):
        args.func(args)
