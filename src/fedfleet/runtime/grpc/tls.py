"""TLS credentials from a certificate folder made by ``fedfleet certs`` (``ca.crt``, ``<name>.crt/.key``).

Always mutual: the arbiter requires a client certificate signed by the job's CA, and a party's identity is
the common name of that certificate, never a field of a message.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from fedfleet.errors import ConfigError

ARBITER_NAME = "arbiter"  # the common name of the arbiter's certificate


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path} does not exist; create it with `fedfleet certs init {path.parent}` and "
            f"`fedfleet certs issue {path.parent} <name>`, or run with --insecure on a trusted network"
        ) from None


def server_credentials(certs: str | Path, name: str = ARBITER_NAME) -> grpc.ServerCredentials:
    d = Path(certs)
    pair = (_read(d / f"{name}.key", "key"), _read(d / f"{name}.crt", "certificate"))
    return grpc.ssl_server_credentials([pair], root_certificates=_read(d / "ca.crt", "CA"), require_client_auth=True)


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
