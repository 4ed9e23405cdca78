"""Deployed federation over gRPC: an arbiter server, parties that dial in, and the runtime the loop drives."""

from fedfleet.runtime.grpc.arbiter import ArbiterServer
from fedfleet.runtime.grpc.party import Connection, Party, PartyRejected, SessionFailed
from fedfleet.runtime.grpc.runtime import GrpcRuntime, PartiesMissingError
from fedfleet.runtime.grpc.sync_party import SyncParty

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
