"""TLS credentials from a certificate folder made by ``fedfleet certs`` (``ca.crt``, ``<name>.crt/.key``).

Always mutual: the arbiter requires a client certificate signed by the job's CA, and a party's identity is
the common name of that certificate, never a field of a message. The other way round, a party accepts only a
certificate of the job's CA valid for the name ``arbiter`` (``ARBITER_CHANNEL_OPTIONS``), whatever address it
dials: another party's certificate cannot pose as the arbiter and collect the updates.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedfleet.errors import ConfigError

__all__ = [
    "ARBITER_CHANNEL_OPTIONS",
    "ARBITER_NAME",
    "arbiter_problem",
    "channel_credentials",
    "check_arbiter_certificate",
    "peer_identity",
    "server_credentials",
]

ARBITER_NAME = "arbiter"  # the common name and the DNS name of the arbiter's certificate (`fedfleet certs`)
# a party's channel options on top of its credentials: the server must prove the name "arbiter" (the DNS name
# only the arbiter's certificate carries), not the host or IP that was dialled, which no certificate has to match
ARBITER_CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", ARBITER_NAME),)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path} does not exist; create it with `fedfleet certs init {path.parent}` and "
            f"`fedfleet certs issue {path.parent} <name>`, or run with --insecure on a trusted network"
        ) from None


def server_credentials(certs: str | Path, name: str = ARBITER_NAME) -> grpc.ServerCredentials:
    """The arbiter's credentials; refused (ConfigError) for a certificate the parties would not accept."""
    d = Path(certs)
    pair = (_read(d / f"{name}.key", "key"), _read(d / f"{name}.crt", "certificate"))
    check_arbiter_certificate(d / f"{name}.crt")
    return grpc.ssl_server_credentials([pair], root_certificates=_read(d / "ca.crt", "CA"), require_client_auth=True)


def arbiter_problem(cert: Path) -> str | None:
    """Why parties would refuse ``cert`` as the arbiter's certificate; None when they accept it (chain aside).

    A party accepts only a server certificate (serverAuth usage) valid for the DNS name ``arbiter``, whatever
    address it dials: a party's certificate, or one made elsewhere for the arbiter's hosts only, is refused.
    """
    try:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
    except FileNotFoundError:
        return f"certificate {cert} does not exist"
    except ValueError as exc:
        return f"{cert} is not a PEM certificate ({exc})"
    eku = _extension(c, x509.ExtendedKeyUsage)
    if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku):
        return f"{cert} is not a TLS server certificate (its extended key usage lacks serverAuth)"
    san = _extension(c, x509.SubjectAlternativeName)
    names = [] if san is None else san.get_values_for_type(x509.DNSName)
    if ARBITER_NAME not in {name.lower().rstrip(".") for name in names}:  # as TLS compares them
        return f"{cert} is not valid for the name {ARBITER_NAME!r} (no DNS:{ARBITER_NAME} subject alternative name)"
    return None


def check_arbiter_certificate(cert: Path) -> None:
    """Refuse to serve with a certificate that parties would refuse: without this, the arbiter would start and
    every party would only log ``connection lost (UNAVAILABLE: ... Hostname Verification Check failed)``."""
    problem = arbiter_problem(cert)
    if problem is not None:
        raise ConfigError(
            f"{problem}, so parties, which check that name whatever address they dial, would refuse this arbiter;"
            f" re-issue it with `fedfleet certs issue {cert.parent} {ARBITER_NAME} --overwrite` (add the same"
            " --host options as before); the parties' certificates and ca.crt stay as they are"
        )


def _extension(cert: x509.Certificate, kind: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def channel_credentials(certs: str | Path, name: str) -> grpc.ChannelCredentials:
    d = Path(certs)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(d / "ca.crt", "CA"),
        private_key=_read(d / f"{name}.key", "key"),
        certificate_chain=_read(d / f"{name}.crt", "certificate"),
    )


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The common name of the verified client certificate; None on an insecure channel."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None
