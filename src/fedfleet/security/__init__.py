"""Security: certificates for mutual TLS, so a party's identity comes from its certificate, not from a message."""

from fedfleet.security.certs import CertificateError, describe, init_ca, issue, load_identity

__all__ = ["CertificateError", "describe", "init_ca", "issue", "load_identity"]
