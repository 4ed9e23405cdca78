"""Secure-aggregation jobs for the gRPC tests: the digits job of tests/grpc_jobs.py with four parties.

Four, not three: with k = n - 1 = 2 neighbours and t = 2 each survivor's self-mask seed would need both its
neighbours alive, so three parties survive no dropout after their shares; four (k = 3, t = 2) survive one.
"""

from __future__ import annotations

from pathlib import Path

from tests.grpc_jobs import ThreadedFederation, make_certs, write_job

PARTIES4 = ["guest-9999", "host-10000", "host-10001", "host-10002"]
SECURE = "secure_aggregation: {clip: 1.0, bits: 16}\n"
FOUR = ["data.clients=4", "cohort=4", f"network.parties=[{','.join(PARTIES4)}]"]


def secure_job(tmp_path: Path, extra: str = SECURE) -> Path:
    make_certs(tmp_path / "certs", PARTIES4)
    return write_job(tmp_path, extra)


def secure_federation(
    tmp_path: Path, overrides=(), insecure: bool = False, extra: str = SECURE, **kwargs
) -> ThreadedFederation:
    """The four-party secure job in threads, over mutual TLS unless ``insecure`` (``extra=""``: the plain job)."""
    return ThreadedFederation(secure_job(tmp_path, extra), [*FOUR, *overrides], insecure=insecure, **kwargs)
