"""A small certificate authority for mutual TLS between the arbiter and the parties of a job.

A party's identity is the CN of its certificate, so the CA that signs them is the root of trust: its key and
every party key are written 0o600 and never overwritten by accident. EC P-256 keeps keys small and handshakes fast.

Only the arbiter serves. Its certificate (name ``arbiter``) is a TLS server certificate valid for the DNS name
``arbiter`` besides its hosts, and a party accepts no other server name, whatever address it dials; a party's
certificate is a client certificate with no host names, so it cannot pose as the arbiter.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfleet.errors import UserError

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# the one server name a party accepts (fedfleet.runtime.grpc.tls.ARBITER_NAME, which it pins with gRPC's
# ssl_target_name_override; security may not import the runtime, a test pins that the two agree): only the
# arbiter's certificate carries it, so no other certificate of the CA can stand in for the arbiter
ARBITER_NAME = "arbiter"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
DNS_NAME_RE = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?")
# parties' clocks disagree a little; a certificate valid "from now" could be rejected by a peer that lags behind
CLOCK_SKEW = dt.timedelta(minutes=5)


class CertificateError(UserError):
    """A certificate or key cannot be created or read; the message names the file and the fix."""


def init_ca(directory: Path, *, name: str = "fedfleet-ca", days: int = 3650, overwrite: bool = False) -> Path:
    """Create ``ca.key`` and a self-signed ``ca.crt`` in ``directory``; return the certificate path.

    path_length=0: the CA signs party certificates only, never another CA.
    """
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    _check_days(days)
    _refuse_existing(key_path, overwrite)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path


def issue(
    directory: Path,
    name: str,
    *,
    hosts: Sequence[str] | None = None,
    days: int = 825,
    server: bool | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Sign a key pair for ``name`` with the CA in ``directory``; return ``(<name>.key, <name>.crt)``.

    The pair is in the order ``grpc.ssl_server_credentials`` wants it.

    ``name == "arbiter"``: a TLS server certificate (serverAuth only) valid for ``hosts`` (default localhost,
    127.0.0.1 and ::1) and the DNS name ``arbiter``, the name every party checks. Any other name is a party's: a
    TLS client certificate (clientAuth only) with no host names, since a party only dials. ``server=True`` lets a
    party's certificate serve too (clientAuth and serverAuth, valid for ``hosts`` and its name); it still cannot
    pass for the arbiter, whose name no other certificate may carry. ``server=False`` for the arbiter is refused.
    """
    directory = Path(directory)
    _check_name(name)
    _check_days(days)
    serves = _serves(name, hosts, server)
    sans = _sans(name, DEFAULT_HOSTS if hosts is None else hosts) if serves else []
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    _refuse_existing(key_path, overwrite)
    ca_key, ca_cert = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # a leaf that outlives its CA would be rejected anyway; cap it so `certs list` shows the real expiry
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if name == ARBITER_NAME:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]  # it only listens; TLS refuses it as a party's certificate
    elif serves:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]  # TLS refuses it as a server's certificate
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key_path, cert_path


def uses(cert: x509.Certificate) -> str:
    """What a certificate may be in a TLS handshake: ``ca``, ``client``, ``server`` or ``client+server``."""
    basic = _extension(cert, x509.BasicConstraints)
    if basic is not None and basic.ca:
        return "ca"
    ends = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}
    return "+".join(end for end, oid in ends.items() if _allows(cert, oid)) or "none"


def load_identity(cert: Path) -> str:
    """The party identity (subject CN) that a certificate file vouches for."""
    return _common_name(_read_cert(Path(cert)).subject, Path(cert))


def describe(directory: Path) -> list[dict[str, Any]]:
    """One entry per ``*.crt`` in ``directory`` (sorted by name): what ``fedfleet certs list`` shows."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CertificateError(f"{directory} is not a directory; create a CA with `fedfleet certs init {directory}`")
    rows = []
    for path in sorted(directory.glob("*.crt")):
        cert = _read_cert(path)
        rows.append(
            {
                "name": path.stem,
                "path": path,
                "cn": _common_name(cert.subject, path),
                "not_after": cert.not_valid_after_utc,
                "issuer": _common_name(cert.issuer, path),
                "uses": uses(cert),
            }
        )
    return rows


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if not key_path.is_file() or not cert_path.is_file():
        raise CertificateError(
            f"no CA in {directory} ({CA_KEY}, {CA_CERT}); run `fedfleet certs init {directory}` first"
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise CertificateError(f"{key_path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an EC key; recreate the CA with `fedfleet certs init --overwrite`")
    return key, _read_cert(cert_path)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise CertificateError(f"certificate {path} does not exist") from exc
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate: {exc}") from exc


def _common_name(name: x509.Name, path: Path) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise CertificateError(f"{path} has no common name (CN); issue it with `fedfleet certs issue`")
    value = attrs[0].value
    return value.decode() if isinstance(value, bytes) else value


def _extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _allows(cert: x509.Certificate, purpose: x509.ObjectIdentifier) -> bool:
    """Whether TLS accepts ``cert`` for ``purpose``: no extended key usage allows every purpose."""
    eku = _extension(cert, x509.ExtendedKeyUsage)
    return eku is None or purpose in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


def _as_host(name: str) -> str:
    """A name as TLS matches it: case-insensitively, a trailing dot ignored."""
    return name.lower().rstrip(".")


def _serves(name: str, hosts: Sequence[str] | None, server: bool | None) -> bool:
    """Whether the certificate for ``name`` is a server's; refuse what would let a party pose as the arbiter."""
    if name == ARBITER_NAME:
        if server is False:
            raise CertificateError(
                f"{ARBITER_NAME!r} is the arbiter's name and the arbiter serves: its certificate is always a server"
                " certificate; give a party another name (e.g. guest-9999)"
            )
        return True
    if _as_host(name) == ARBITER_NAME:
        raise CertificateError(
            f"{name!r} would match the arbiter's name {ARBITER_NAME!r} (TLS compares names case-insensitively):"
            f" issue the arbiter's certificate as {ARBITER_NAME!r}, or give a party another name"
        )
    if hosts is not None and not server:
        raise CertificateError(
            f"--host is for a certificate that serves; {name!r} is a party, which only dials the arbiter and needs"
            " no host names. Drop --host, or add --server if this party must also serve TLS"
        )
    for host in hosts or ():
        if _as_host(host) == ARBITER_NAME:
            raise CertificateError(
                f"host {host!r} is the arbiter's name: only the certificate named {ARBITER_NAME!r} may carry it"
            )
    return bool(server)


def _sans(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in [*hosts, name]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not DNS_NAME_RE.fullmatch(host):
                if host == name:  # names like `guest_1` are fine identities, just not DNS names
                    continue
                raise CertificateError(f"host {host!r} is neither an IP address nor a DNS name") from None
            entry = x509.DNSName(host)
        if entry not in sans:
            sans.append(entry)
    return sans


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise CertificateError(
            f"bad certificate name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or"
            " digit (e.g. arbiter, guest-9999)"
        )
    if name == "ca":
        raise CertificateError("the name 'ca' is the CA's own files (ca.key, ca.crt); pick another party name")


def _check_days(days: int) -> None:
    if days < 1:
        raise CertificateError(f"--days must be at least 1, got {days}")


def _refuse_existing(key_path: Path, overwrite: bool) -> None:
    if key_path.exists() and not overwrite:
        raise CertificateError(
            f"{key_path} already exists; pass --overwrite to replace it (old certificates stop working)"
        )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # unencrypted, as gRPC wants it; the 0o600 file mode is what protects it
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (tmp, fsync, rename): a crash never leaves a half key. The tmp file is born with ``mode``,
    so a key is never world-readable, not even for an instant."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exact mode whatever the umask; a key can only have lost bits, never gained them
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
