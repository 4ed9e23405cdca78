"""Where a party is and whom it talks to: FATE-LLM's ``create_context``, over gRPC or in-process.

``create_context(local_party=("guest", "9999"), parties=[...], session_id=..., arbiter_address=...)``
gives a context for the gRPC runtime (mutual TLS from a ``fedfleet certs`` folder, or ``insecure=True``).
``LocalFederation(2).context(i)`` gives in-process contexts for tests and notebooks: the parties run in
threads of one process and the weighted mean is taken in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import Connection, SyncParty
from fedfleet.runtime.grpc.tls import channel_credentials

ARBITER_ROLE = "arbiter"
DATA_ROLES = ("guest", "host")


class SyncChannel(Protocol):
    """What a training party needs: start from the common params, then sync at its own sync points."""

    def start(self, params: FlatParams, timeout: float | None = None) -> FlatParams: ...

    def sync(
        self, params: FlatParams, weight: float, metrics: dict[str, float] | None = None, timeout: float | None = None
    ) -> bool: ...

    def close(self) -> None: ...


def party_name(party: tuple[str, str | int]) -> str:
    role, pid = party
    if role not in (ARBITER_ROLE, *DATA_ROLES):
        raise ConfigError(f"party role {role!r}: use guest, host or arbiter")
    return f"{role}-{pid}"


@dataclass(frozen=True)
class Context:
    """One party's view of the session (``role`` is guest, host or arbiter)."""

    local_party: tuple[str, str]
    parties: tuple[tuple[str, str], ...]
    session_id: str
    arbiter_address: str = "127.0.0.1:50051"
    certs: str | None = "certs"  # None: plaintext (insecure=True)
    heartbeat_s: float = 5.0
    reconnect_max_s: float = 30.0
    connect_attempts: int | None = 30  # consecutive failed dials before giving up (None: forever)

    @property
    def role(self) -> str:
        return self.local_party[0]

    @property
    def name(self) -> str:
        return party_name(self.local_party)

    @property
    def is_arbiter(self) -> bool:
        return self.role == ARBITER_ROLE

    @property
    def data_parties(self) -> list[str]:
        return [party_name(p) for p in self.parties if p[0] != ARBITER_ROLE]

    def channel(self, spec: ParamSpec, rounds: int) -> SyncChannel:
        if self.is_arbiter:
            raise ConfigError("the arbiter does not train; use FedAvgServer(ctx) on the arbiter")
        credentials = None if self.certs is None else channel_credentials(self.certs, self.name)
        connection = Connection(
            self.arbiter_address,
            self.session_id,
            self.name,
            credentials,
            heartbeat_s=self.heartbeat_s,
            reconnect_max_s=self.reconnect_max_s,
            max_attempts=self.connect_attempts,
        )
        return SyncParty(spec, connection, rounds=rounds)


def create_context(
    local_party: tuple[str, str | int],
    parties: Sequence[tuple[str, str | int]],
    session_id: str,
    arbiter_address: str = "127.0.0.1:50051",
    certs: str | None = "certs",
    insecure: bool = False,
) -> Context:
    """A party's context for a deployed session (FATE-LLM's ``create_context`` for the gRPC runtime)."""
    norm = tuple((str(r), str(i)) for r, i in parties)
    local = (str(local_party[0]), str(local_party[1]))
    names = [party_name(p) for p in norm]
    if party_name(local) not in names:
        raise ConfigError(f"local party {party_name(local)} is not among the parties ({', '.join(names)})")
    if sum(r == ARBITER_ROLE for r, _ in norm) != 1:
        raise ConfigError("the parties must include exactly one arbiter, e.g. ('arbiter', '10000')")
    if not any(r in DATA_ROLES for r, _ in norm):
        raise ConfigError("the parties must include at least one guest or host")
    return Context(local, norm, session_id, arbiter_address, None if insecure else certs)


class LocalFederation:
    """In-process parties (threads): the same sync semantics as the gRPC runtime, no network."""

    def __init__(self, parties: int) -> None:
        if parties < 1:
            raise ConfigError("a local federation needs at least one party")
        self.size = parties
        self._cv = threading.Condition()
        self._initial: FlatParams | None = None
        self._sum: FlatParams | None = None
        self._weight = 0.0
        self._arrived = 0
        self._generation = 0
        self._result: FlatParams | None = None
        self.rounds = 0

    def context(self, index: int) -> LocalContext:
        return LocalContext(self, index)

    def _start(self, index: int, params: FlatParams) -> None:
        with self._cv:
            if index == 0:  # every party starts from party 0's params, as over gRPC
                self._initial = params.clone()
                self._cv.notify_all()
            self._cv.wait_for(lambda: self._initial is not None)
            params.copy_(self._initial)

    def _sync(self, params: FlatParams, weight: float) -> None:
        with self._cv:
            generation = self._generation
            if self._sum is None:
                self._sum = params.zeros_like()
            self._sum.add_(params, alpha=weight)
            self._weight += weight
            self._arrived += 1
            if self._arrived == self.size:
                self._result = self._sum.mul_(1.0 / self._weight)
                self._sum, self._weight, self._arrived = None, 0.0, 0
                self._generation += 1
                self.rounds += 1
                self._cv.notify_all()
            else:
                self._cv.wait_for(lambda: self._generation != generation)
            params.copy_(self._result)


class LocalContext:
    def __init__(self, federation: LocalFederation, index: int) -> None:
        self.federation = federation
        self.index = index
        self.name = f"party-{index}"
        self.is_arbiter = False

    def channel(self, spec: ParamSpec, rounds: int) -> SyncChannel:
        return _LocalChannel(self.federation, self.index, rounds)


class _LocalChannel:
    def __init__(self, federation: LocalFederation, index: int, rounds: int) -> None:
        self.federation, self.index, self.rounds, self.syncs = federation, index, rounds, 0

    def start(self, params: FlatParams, timeout: float | None = None) -> FlatParams:
        self.federation._start(self.index, params)
        return params

    def sync(
        self, params: FlatParams, weight: float, metrics: dict[str, float] | None = None, timeout: float | None = None
    ) -> bool:
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        self.federation._sync(params, weight)
        self.syncs += 1
        return self.syncs < self.rounds

    def close(self) -> None:
        pass
