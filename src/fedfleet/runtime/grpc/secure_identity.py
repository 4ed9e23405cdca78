"""Binding a party's secure-aggregation keys to its certificate: signed adverts.

Each round a party draws fresh X25519 keys and advertises them through the arbiter. An arbiter that swapped in
keys of its own would sit between every pair of parties (it could then simulate a party's neighbours and unmask
its input), so on a session with mutual TLS each party signs its advert (session, round, its id, both keys) with
the private key of its TLS certificate (EC P-256, ECDSA-SHA256, ``fedfleet certs``) and sends the certificate
along. The arbiter checks each advert before it relays it (a bad one costs only its sender) and each party checks
its neighbours' again against the job's CA: issued by the CA, valid now, a client certificate of a party of the
job, one certificate per neighbour, and the signature over exactly the keys and id the roster gives. Without
the CA's key nobody, the arbiter included, can advertise a key for a party.

On an ``--insecure`` session there are no certificates: adverts go unsigned and identities are taken on trust.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfleet.runtime.grpc.secure_wire import Signed
from fedfleet.secagg import crypto


def statement(session: str, round: int, party: int, cipher_pk: bytes, mask_pk: bytes) -> bytes:
    """The bytes a party signs: length-prefixed context (no two adverts encode alike), then the two keys."""
    return crypto.context(session, round, (party,), "advert") + cipher_pk + mask_pk


class Signer:
    """A party's TLS key and certificate, which sign its adverts."""

    def __init__(self, certs: str | Path, name: str) -> None:
        folder = Path(certs)
        key = serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{folder / name}.key is not an EC key; re-issue it with `fedfleet certs issue`")
        self._key = key
        cert = x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes())
        self.certificate = cert.public_bytes(serialization.Encoding.DER)

    def sign(self, session: str, round: int, party: int, cipher_pk: bytes, mask_pk: bytes) -> Signed:
        message = statement(session, round, party, cipher_pk, mask_pk)
        return Signed(self._key.sign(message, ec.ECDSA(hashes.SHA256())), self.certificate)


class Verifier:
    """Checks signed adverts against the job's CA; ``parties``: the names a certificate may carry."""

    def __init__(self, certs: str | Path, parties: Collection[str]) -> None:
        self.ca = x509.load_pem_x509_certificate((Path(certs) / "ca.crt").read_bytes())
        self.parties = frozenset(parties)

    def check(
        self, signed: Signed, session: str, round: int, party: int, cipher_pk: bytes, mask_pk: bytes
    ) -> tuple[str, str]:
        """(the signer's party name, why the advert's keys are not bound to its certificate, or "")."""
        name, problem = self._identity(signed)
        if problem:
            return name, problem
        key = x509.load_der_x509_certificate(signed.certificate).public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return name, f"{name}'s certificate does not hold an EC key"
        message = statement(session, round, party, cipher_pk, mask_pk)
        try:
            key.verify(signed.signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return name, f"the signature of {name}'s advert as party {party} does not verify"
        return name, ""

    def _identity(self, signed: Signed) -> tuple[str, str]:
        """(the certificate's party name, why it is not a party's certificate of this job's CA or "")."""
        if not signed.certificate or not signed.signature:
            return "", "the advert is not signed (a session with certificates signs every advert)"
        try:
            cert = x509.load_der_x509_certificate(signed.certificate)
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            return "", "the advert's certificate is not one the job's CA issued"
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return "", "the advert's certificate is not valid now"
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        if name not in self.parties:
            return name, f"the advert's certificate is for {name[:64]!r}, not a party of the job"
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            return name, f"{name}'s certificate is not a party's (client) certificate"
        return name, ""
