"""Deployed federation over gRPC: an arbiter server, parties that dial in, and the runtime the loop drives.

The names are imported on first use, so the light modules here (``wire``, ``settings``) load without
grpc or torch (a job file's ``network:`` section is parsed with ``settings``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedfleet.lazy import lazy_names

_LAZY = {
    "ArbiterServer": "fedfleet.runtime.grpc.arbiter",
    "Connection": "fedfleet.runtime.grpc.party",
    "Party": "fedfleet.runtime.grpc.party",
    "PartyRejected": "fedfleet.runtime.grpc.party",
    "SessionFailed": "fedfleet.runtime.grpc.party",
    "GrpcRuntime": "fedfleet.runtime.grpc.runtime",
    "PartiesMissingError": "fedfleet.runtime.grpc.runtime",
    "SyncParty": "fedfleet.runtime.grpc.sync_party",
}

__all__ = [
    "ArbiterServer",
    "Connection",
    "GrpcRuntime",
    "PartiesMissingError",
    "Party",
    "PartyRejected",
    "SessionFailed",
    "SyncParty",
]

if TYPE_CHECKING:
    from fedfleet.runtime.grpc.arbiter import ArbiterServer
    from fedfleet.runtime.grpc.party import Connection, Party, PartyRejected, SessionFailed
    from fedfleet.runtime.grpc.runtime import GrpcRuntime, PartiesMissingError
    from fedfleet.runtime.grpc.sync_party import SyncParty


__getattr__ = lazy_names("fedfleet.runtime.grpc", _LAZY, globals())
