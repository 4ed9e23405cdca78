"""Where a party is and whom it talks to: FATE-LLM's ``create_context`` for a deployed session over gRPC.

``create_context(local_party=("guest", "9999"), parties=[...], session_id=..., arbiter_address=...)``
gives a context for the gRPC runtime (mutual TLS from a ``fedfleet certs`` folder, or ``insecure=True``).
``fedfleet.sync.local.LocalFederation(2).context(i)`` gives in-process contexts of the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc.settings import DEFAULTS
from fedfleet.secagg.config import SecAggConfig

ARBITER_ROLE = "arbiter"
DATA_ROLES = ("guest", "host")


class SyncChannel(Protocol):
    """What a training party needs: start from the common params, then sync at its own sync points."""

    def start(self, params: Any, timeout: float | None = None) -> Any:
        """Load the session's first global params into ``params`` (a ``FlatParams``, in place)."""

    def sync(
        self,
        params: Any,
        weight: float,
        metrics: dict[str, float] | None = None,
        timeout: float | None = None,
        stats: Any = None,
    ) -> bool:
        """Send this round's params (with ``metrics`` to show and ``stats``, a ``TrainStats``, for the strategy),
        load the aggregate into them; False when the session is over."""

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
    arbiter_address: str = DEFAULTS.address
    certs: str | None = DEFAULTS.certs  # None: plaintext (insecure=True)
    heartbeat_s: float = DEFAULTS.heartbeat_s
    reconnect_max_s: float = DEFAULTS.reconnect_max_s
    give_up_s: float | None = DEFAULTS.give_up_s  # seconds without reaching the arbiter before giving up
    connect_attempts: int | None = None  # consecutive failed dials before giving up (None: give_up_s decides)

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

    def channel(
        self,
        spec: Any,
        rounds: int,
        pipeline: Any = None,
        seed: int = 0,
        vocab: str = "",
        secure: bool | SecAggConfig = False,
    ) -> SyncChannel:
        """The party's stream to the arbiter for ``rounds`` syncs of params laid out as ``spec``; ``pipeline``'s
        party-side transforms see each delta before it leaves (``seed``: their randomness, and the secure
        quantiser's rounding); ``vocab``: the fingerprint of the party's token ids, which must be the other
        parties'. ``secure``: mask every update (SecAgg+); True takes the settings every party and the arbiter
        derive from the number of parties (``secagg.config.for_parties``), a ``SecAggConfig`` fixes them."""
        if self.is_arbiter:
            raise ConfigError("the arbiter does not train; use FedAvgServer(ctx) on the arbiter")
        from fedfleet.runtime.grpc import SyncParty  # grpc and torch only for a party that trains

        stages = self._secure_stages(secure, seed) if secure else None
        return SyncParty(spec, self._connection(), rounds=rounds, pipeline=pipeline, seed=seed, vocab=vocab,
                         secure=stages)  # fmt: skip

    def sharded_channel(self, spec: Any, rounds: int, rank: int, world: int = 1) -> Any:
        """One rank's stream of the sharded exchange (an FSDP party): it sends and receives only its own boxes
        of the params laid out as ``spec``; every rank of the party calls this (``runtime/grpc/sharded_party``)."""
        if self.is_arbiter:
            raise ConfigError("the arbiter does not train; use FedAvgServer(ctx) on the arbiter")
        from fedfleet.runtime.grpc.sharded_party import ShardedGrpcChannel

        return ShardedGrpcChannel(self._connection(), spec, rounds, rank, world)

    def _connection(self) -> Any:
        from fedfleet.runtime.grpc import Connection
        from fedfleet.runtime.grpc.tls import channel_credentials

        credentials = None if self.certs is None else channel_credentials(self.certs, self.name)
        return Connection(
            self.arbiter_address,
            self.session_id,
            self.name,
            credentials,
            heartbeat_s=self.heartbeat_s,
            reconnect_max_s=self.reconnect_max_s,
            max_attempts=self.connect_attempts,
            give_up_s=self.give_up_s,
        )

    def _secure_stages(self, secure: bool | SecAggConfig, seed: int) -> Any:
        """This party's side of secure rounds: with certificates it signs its adverts with its own and checks its
        neighbours' against the session's CA (on ``insecure=True`` identities are taken on trust)."""
        from fedfleet.runtime.grpc.secure_identity import Signer, Verifier
        from fedfleet.runtime.grpc.secure_party import SecureStages
        from fedfleet.secagg.config import for_parties

        parties = self.data_parties
        config = secure if isinstance(secure, SecAggConfig) else for_parties(len(parties))
        config.validate(len(parties))  # a bad setting (or a lone party) is named before the party joins
        signer = None if self.certs is None else Signer(self.certs, self.name)
        verifier = None if self.certs is None else Verifier(self.certs, parties)
        return SecureStages(config, self.session_id, self.name, parties, seed, signer, verifier)


# FATE-LLM's create_context keywords that name its own federation and computing engines: what to give instead
FATE_ENGINE_KEYWORDS = {
    "federation_engine": "fedfleet's parties dial the arbiter over gRPC: give arbiter_address= (and certs=)",
    "federation_conf": "give arbiter_address= and certs= (or insecure=True on a trusted network)",
    "computing_engine": "each data owner trains in its own process (or torchrun / deepspeed group): drop it",
}


def create_context(
    local_party: tuple[str, str | int],
    parties: Sequence[tuple[str, str | int]],
    session_id: str | None = None,
    arbiter_address: str = DEFAULTS.address,
    certs: str | None = DEFAULTS.certs,
    insecure: bool = False,
    *,
    give_up_s: float | None = DEFAULTS.give_up_s,
    federation_session_id: str | None = None,
    **fate_keywords: Any,
) -> Context:
    """A party's context for a deployed session (FATE-LLM's ``create_context`` for the gRPC runtime).

    ``give_up_s``: a party stops (``ConnectionError``) once the arbiter has been out of reach this long (not
    started, wrong address, down), 10 minutes by default; ``None`` redials forever. A TLS set-up mistake stops
    it at once (``HandshakeFailed``). ``federation_session_id`` is FATE-LLM's name for ``session_id``; FATE's
    engine keywords are refused with what fedfleet takes instead."""
    for key in fate_keywords:
        if key not in FATE_ENGINE_KEYWORDS:
            raise TypeError(f"create_context() got an unexpected keyword argument {key!r}")
        raise ConfigError(f"create_context: {key} is FATE-LLM's; {FATE_ENGINE_KEYWORDS[key]}")
    if session_id is not None and federation_session_id is not None and session_id != federation_session_id:
        raise ConfigError("give session_id or federation_session_id (FATE-LLM's name for it), not both")
    session_id = session_id if session_id is not None else federation_session_id
    if not session_id:
        raise ConfigError("create_context needs the session's id: session_id= (FATE-LLM: federation_session_id=)")
    norm = tuple((str(r), str(i)) for r, i in parties)
    local = (str(local_party[0]), str(local_party[1]))
    names = [party_name(p) for p in norm]
    if party_name(local) not in names:
        raise ConfigError(f"local party {party_name(local)} is not among the parties ({', '.join(names)})")
    if sum(r == ARBITER_ROLE for r, _ in norm) != 1:
        raise ConfigError("the parties must include exactly one arbiter, e.g. ('arbiter', '10000')")
    if not any(r in DATA_ROLES for r, _ in norm):
        raise ConfigError("the parties must include at least one guest or host")
    if give_up_s is not None and not give_up_s > 0:
        raise ConfigError(f"create_context: give_up_s must be > 0 seconds (or None: forever), got {give_up_s}")
    return Context(local, norm, session_id, arbiter_address, None if insecure else certs, give_up_s=give_up_s)
