"""Where a party is and whom it talks to: FATE-LLM's ``create_context``, over gRPC or in-process.

``create_context(local_party=("guest", "9999"), parties=[...], session_id=..., arbiter_address=...)``
gives a context for the gRPC runtime (mutual TLS from a ``fedfleet certs`` folder, or ``insecure=True``).
``LocalFederation(2).context(i)`` gives in-process contexts for tests and notebooks: the parties run in
threads of one process and the weighted mean is taken in memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import Connection, SyncParty
from fedfleet.runtime.grpc.chunks import spec_difference
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
    """In-process parties (threads): the same sync semantics as the gRPC runtime, no network.

    Every party must plan the same number of syncs (as the arbiter demands); a party whose training fails
    or stops early leaves, and the others' next sync raises instead of waiting. ``timeout``: seconds a
    party waits for the others at the start or a sync. ``reproducible``: the parties train in turns
    (between syncs, one after another), each with its own random-number state seeded from its
    ``TrainingArguments.seed`` (Lightning: ``FedLightningCallback(seed=)``), so dropout draws and data
    order do not depend on how the threads were scheduled and a seeded run gives the same result every
    time. False lets the parties train at once: faster where each party alone cannot use the machine, not
    reproducible.
    """

    def __init__(self, parties: int, timeout: float | None = 600.0, reproducible: bool = True) -> None:
        if parties < 1:
            raise ConfigError("a local federation needs at least one party")
        self.size = parties
        self.timeout = timeout
        self.reproducible = reproducible
        self._cv = threading.Condition()
        self._floor = threading.Lock()  # held by the party whose turn it is to train
        self._initial: FlatParams | None = None
        self._planned: dict[int, int] = {}
        self._left: str | None = None  # why the federation cannot go on
        self._arrived: dict[int, tuple[FlatParams, float]] = {}
        self._generation = 0
        self._result: FlatParams | None = None
        self.rounds = 0

    def context(self, index: int) -> LocalContext:
        if not 0 <= index < self.size:
            raise ConfigError(f"party index {index}: this federation has parties 0..{self.size - 1}")
        return LocalContext(self, index)

    def _wait(self, ready: Callable[[], bool], what: str, here: Collection[int], timeout: float | None) -> None:
        """Wait (holding the condition) until ``ready`` or a party left; raise on either failure.
        ``here``: the parties that have arrived (the error names the others)."""
        limit = self.timeout if timeout is None else timeout
        if not self._cv.wait_for(lambda: ready() or self._left is not None, limit):
            missing = ", ".join(f"party-{i}" for i in range(self.size) if i not in here)
            raise TimeoutError(f"waited {limit:g} s {what} for {missing}; did its training start, or hang?")
        if self._left is not None and not ready():
            raise RuntimeError(f"the federation cannot go on: {self._left}")

    def _start(self, index: int, params: FlatParams, rounds: int, timeout: float | None) -> None:
        with self._cv:
            self._planned[index] = rounds
            if index == 0:  # every party starts from party 0's params, as over gRPC
                self._initial = params.clone()
            self._cv.notify_all()
            self._wait(lambda: len(self._planned) == self.size, "at the start", self._planned, timeout)
            if params.spec != self._initial.spec:
                raise ConfigError(
                    f"party-{index}'s model has another param layout than party-0's (is it the same architecture?): "
                    f"{spec_difference(self._initial.spec, params.spec)}"
                )
            plans = {r for r in self._planned.values() if r > 0}
            if len(plans) > 1:
                listed = ", ".join(f"party-{i}: {r}" for i, r in sorted(self._planned.items()))
                raise ConfigError(
                    f"the parties plan different numbers of syncs ({listed}); give every party the same "
                    "epochs or max_steps and FedArguments, or the others would wait forever for the last syncs"
                )
            params.copy_(self._initial)

    def _sync(self, index: int, params: FlatParams, weight: float, timeout: float | None) -> None:
        with self._cv:
            if self._left is not None:
                raise RuntimeError(f"the federation cannot go on: {self._left}")
            generation = self._generation
            self._arrived[index] = (params, weight)  # a party's params stay untouched while it waits here
            if len(self._arrived) == self.size:
                self._result = self._mean()
                self._arrived = {}
                self._generation += 1
                self.rounds += 1
                self._cv.notify_all()
            else:
                arrived = self._arrived  # the same dict until the round completes
                self._wait(lambda: self._generation != generation, f"at sync {self.rounds + 1}", arrived, timeout)
            params.copy_(self._result)

    def _mean(self) -> FlatParams:
        """The weighted mean, summed in party order: the same bits whichever thread arrived first."""
        total = sum(weight for _, weight in self._arrived.values())
        mean = next(iter(self._arrived.values()))[0].zeros_like()
        for index in sorted(self._arrived):
            params, weight = self._arrived[index]
            mean.add_(params, alpha=weight / total)
        return mean

    def _leave(self, index: int, syncs: int, rounds: int) -> None:
        with self._cv:
            if self._left is None:
                self._left = f"party-{index} left after {syncs} of {rounds} syncs (its training failed or stopped)"
            self._cv.notify_all()


class LocalContext:
    def __init__(self, federation: LocalFederation, index: int) -> None:
        self.federation = federation
        self.index = index
        self.name = f"party-{index}"
        self.is_arbiter = False

    def channel(self, spec: ParamSpec, rounds: int) -> SyncChannel:
        return _LocalChannel(self.federation, self.index, rounds)

    def turn(self, seed: int) -> _Turn | None:
        """What makes this party's run reproducible in a shared process (None: the parties overlap freely)."""
        return _Turn(self.federation._floor, seed) if self.federation.reproducible else None


class _LocalChannel:
    def __init__(self, federation: LocalFederation, index: int, rounds: int) -> None:
        self.federation, self.index, self.rounds, self.syncs = federation, index, rounds, 0
        self._closed = False

    def start(self, params: FlatParams, timeout: float | None = None) -> FlatParams:
        self.federation._start(self.index, params, self.rounds, timeout)
        return params

    def sync(
        self, params: FlatParams, weight: float, metrics: dict[str, float] | None = None, timeout: float | None = None
    ) -> bool:
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        self.federation._sync(self.index, params, weight, timeout)
        self.syncs += 1
        return self.syncs < self.rounds

    def close(self) -> None:
        if not self._closed and self.syncs < self.rounds:  # leaving early: the others must not wait for us
            self.federation._leave(self.index, self.syncs, self.rounds)
        self._closed = True


class _Turn:
    """One in-process party's run: it holds the federation's floor while it trains and lets go only while it
    waits at a start or sync, and it brings its own random-number state. torch's generators are
    process-wide, so otherwise the threads' dropout draws and data-order seeds would interleave at random.
    The first turn seeds torch with the party's seed, as a process of its own would."""

    def __init__(self, lock: threading.Lock, seed: int) -> None:
        self.lock = lock
        self.seed = seed
        self.cpu: torch.Tensor | None = None
        self.cuda: list[torch.Tensor] | None = None
        self._outer: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None
        self.held = False

    def __enter__(self) -> _Turn:
        self.lock.acquire()
        self.held = True
        cuda = torch.cuda.is_initialized()
        self._outer = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
        if self.cpu is None:
            torch.manual_seed(self.seed)  # every device, like transformers' set_seed
        else:
            torch.set_rng_state(self.cpu)
            if cuda and self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.held:  # already let go (a Lightning run ends through more than one hook)
            return
        try:
            self.cpu = torch.get_rng_state()
            outer_cpu, outer_cuda = self._outer
            if torch.cuda.is_initialized():
                self.cuda = torch.cuda.get_rng_state_all()
                if outer_cuda is not None:
                    torch.cuda.set_rng_state_all(outer_cuda)
            torch.set_rng_state(outer_cpu)
        finally:
            self.held = False
            self.lock.release()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Let the others train while this party waits for them."""
        if not self.held:
            yield
            return
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()
