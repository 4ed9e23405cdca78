"""What a failed TLS handshake means, read from gRPC's error text.

A party redials after a lost connection, since an arbiter that restarts comes back. A handshake that fails
because of the certificates or plaintext against TLS fails the same way every time, so the party stops at
once with what is wrong and how to fix it, instead of redialling for minutes.
"""

from __future__ import annotations

from fedfleet.errors import UserError

NOT_THE_ARBITER = (
    "the server there did not show the certificate the job's CA issued as 'arbiter': check the address, and "
    "that the arbiter's certificate comes from `fedfleet certs issue <dir> arbiter`"
)
# words in gRPC's error -> what is wrong
FATAL: dict[str, str] = {
    "Hostname Verification Check failed": NOT_THE_ARBITER,
    "unsupported certificate purpose": NOT_THE_ARBITER,
    "CERTIFICATE_VERIFY_FAILED": (
        "the arbiter's certificate is not signed by the CA in this party's certificate folder (ca.crt): every "
        "side needs the CA of the job's folder"
    ),
    "WRONG_VERSION_NUMBER": (
        "the server there speaks plaintext (an arbiter started with --insecure) while this party uses mTLS: "
        "start both with certificates, or both with --insecure"
    ),
}
# the arbiter ends the handshake when it does not trust the party's certificate, and when the party speaks
# plaintext to it; an arbiter going down can do it once, so only a streak of them means the setup is wrong
CLOSED = "Socket closed"
CLOSED_STREAK = 5


class HandshakeFailed(UserError, ConnectionError):
    """The party's TLS handshake with the arbiter fails in a way that retrying will not fix."""


def fatal_problem(details: str) -> str:
    """What is wrong, when ``details`` (a gRPC error's) is a handshake failure that will repeat; else ""."""
    return next((meaning for words, meaning in FATAL.items() if words in details), "")


def closed_streak_problem(streak: int) -> str:
    return (
        f"it closed the connection during the TLS handshake {streak} times in a row: this party's certificate is "
        f"not from the job's CA, or this party runs --insecure against an arbiter with mTLS"
    )
