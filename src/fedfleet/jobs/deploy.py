"""A deployed federation built from the same job file a simulation uses: one arbiter, one process per party.

Party ``k`` of ``network.parties`` is client ``k`` of the simulation: with ``network.party_data: shard`` it
trains on shard ``k`` of ``data.partition`` (the demo set-up, which lets a deployed run be checked against
its simulation); with ``whole`` it trains on all of the dataset its own job file names (its private data).

With a ``secure_aggregation:`` section the arbiter's server-driven rounds are SecAgg+ rounds: the arbiter sees
only masked inputs (``runtime/grpc/secure_runtime.py``) and each party masks its own update
(``runtime/grpc/secure_party.py``), signing its keys with its certificate on a session with mutual TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfleet.config.schema import JobConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.data import partition
from fedfleet.data.federated import ClientData
from fedfleet.errors import ConfigError
from fedfleet.jobs.assemble import build_parts, check_folds_fit_the_strategy, fit_config, pipeline_of, selector_of
from fedfleet.runtime.grpc import ArbiterServer, Connection, GrpcRuntime, Party
from fedfleet.runtime.grpc.tls import ARBITER_NAME, channel_credentials, server_credentials
from fedfleet.runtime.grpc.wire import JoinMode
from fedfleet.secagg.config import SecAggConfig, check_cohorts
from fedfleet.strategy import build_strategy

if TYPE_CHECKING:
    from fedfleet.runtime.grpc.secure_party import SecureStages


@dataclass(frozen=True)
class Access:
    """How a process reaches the others: ``certs`` folder for mTLS, or ``insecure`` plaintext."""

    insecure: bool
    certs: str
    address: str


def access_of(job: JobConfig, insecure: bool = False, certs: str | None = None, address: str | None = None) -> Access:
    """How this process connects. Plaintext only when the command line says ``--insecure``: a job file (which
    may come from someone else) cannot switch TLS off by itself, so ``network.insecure: true`` without the flag
    is an error."""
    net = job.network
    if net.insecure and not insecure:
        raise ConfigError(
            "network.insecure: true asks for plaintext, but a job file cannot turn TLS off by itself: confirm with "
            "--insecure on the command line (trusted networks only), or remove network.insecure to use mTLS"
        )
    return Access(insecure, certs or net.certs, address or net.address)


def party_names(job: JobConfig) -> list[str]:
    names = list(job.network.parties)
    if not names:
        raise ConfigError("network.parties is empty: list the parties of the session, e.g. [guest-9999, host-10000]")
    return names


@dataclass
class ArbiterJob:
    """The arbiter's server, runtime and round loop. Without central evaluation the arbiter loads no data, so
    the loop exists only once ``prepare`` has taken the seeded initial model from the first party."""

    runtime: GrpcRuntime
    server: ArbiterServer
    make_loop: Callable[[FlatParams], RoundLoop]
    initial: FlatParams | None = None  # None: the first party's, asked for by ``prepare``
    _loop: RoundLoop | None = None

    @property
    def loop(self) -> RoundLoop:
        if self._loop is None:
            if self.initial is None:
                raise RuntimeError("this arbiter has no initial model yet: start the server and call prepare()")
            self._loop = self.make_loop(self.initial)
        return self._loop

    @property
    def needs_a_party_to_start(self) -> bool:
        return self.initial is None and self._loop is None

    def prepare(self) -> RoundLoop:
        """The round loop; a data-less arbiter first waits for a party and takes its initial model."""
        if self.needs_a_party_to_start:
            self.initial = self.runtime.initial_params()
        return self.loop


def build_arbiter(job: JobConfig, access: Access) -> ArbiterJob:
    """Every check that can fail, then the (not yet started) server and what builds the round loop."""
    if job.fedbuff is not None:
        raise ConfigError(
            "fedbuff runs on the virtual clock of a simulation (fedfleet simulate); a deployed federation runs "
            "synchronous rounds: remove the fedbuff section"
        )
    names = party_names(job)
    if job.cohort > len(names):
        raise ConfigError(f"cohort {job.cohort} is larger than the {len(names)} parties in network.parties")
    min_parties = job.network.min_parties or job.cohort
    if min_parties > job.cohort:
        raise ConfigError(f"network.min_parties {min_parties} is larger than the cohort {job.cohort}")
    strategy = build_strategy(job.strategy.name, **job.strategy.params)
    selector = selector_of(job)
    pipeline = pipeline_of(job, len(names))  # the fold chain; each party's own job file gives its party-side chain
    check_folds_fit_the_strategy(pipeline, strategy)
    refuse_data_attacks(pipeline)
    # the seeded initial model and the test split, only where the arbiter evaluates centrally
    parts = build_parts(job, clients=len(names)) if job.network.central_eval else None
    if job.secure_aggregation is not None:
        check_secure_cohorts(job.secure_aggregation, min_parties, job.cohort)
    credentials = None if access.insecure else server_credentials(access.certs, ARBITER_NAME)
    server_kwargs = dict(
        session=job.network.session,
        parties=names,
        spec=parts.trainer.params.spec if parts is not None else None,
        address=access.address,
        credentials=credentials,
        **job.network.server_limits(),
    )
    server = secure_server(job, access, server_kwargs) if job.secure_aggregation else ArbiterServer(**server_kwargs)
    test = parts.test.to(parts.device) if parts is not None and len(parts.test.y) else None
    runtime = GrpcRuntime(
        server,
        min_parties=min_parties,
        round_timeout=job.network.round_timeout_s(JoinMode.TASKS),
        join_timeout=job.network.join_timeout,
        wait_timeout=job.network.wait_timeout,
        max_weight_ratio=job.network.max_weight_ratio,
        chunk_bytes=job.network.chunk_bytes,
        evaluator=(parts.trainer, test) if test is not None else None,
        secure_aggregation=job.secure_aggregation,
    )

    def make_loop(initial: FlatParams) -> RoundLoop:
        return RoundLoop(
            strategy,
            runtime,
            selector,
            initial,
            fit_config(job),
            LoopConfig(rounds=job.rounds, cohort=job.cohort, seed=job.seed, eval_every=job.eval_every),
            pipeline=pipeline,
        )

    initial = parts.trainer.params.clone().to("cpu") if parts is not None else None
    return ArbiterJob(runtime, server, make_loop, initial)


def refuse_data_attacks(pipeline) -> None:
    """A data attack (label_flip) is played by the simulation on its clients' rows; a deployed party owns its data."""
    for attack in pipeline.client:
        if hasattr(attack, "poison"):
            raise ConfigError(
                f"transforms.client {type(attack).__name__} poisons simulated clients' data; a deployed party trains "
                "on its own data, so run the attack as that party's own program, or simulate the job"
            )


def build_party(job: JobConfig, name: str, access: Access) -> Party:
    names = party_names(job)
    refuse_data_attacks(pipeline_of(job, len(names)))
    if name not in names:
        raise ConfigError(f"party {name!r} is not in network.parties ({', '.join(names)})")
    index = names.index(name)
    if job.network.party_data == "shard":
        parts = build_parts(job, clients=len(names))
        train = parts.federation.client(index)
        test_parts = partition("iid", parts.test.y.numpy(), len(names), job.seed)
        mine = test_parts.client(index)
        evaluation = ClientData(parts.test.x[mine], parts.test.y[mine]).to(parts.device) if len(mine) else None
    else:
        parts = build_parts(job, clients=1)
        train = parts.federation.client(0)
        evaluation = parts.test.to(parts.device) if len(parts.test.y) else None
    credentials = None if access.insecure else channel_credentials(access.certs, name)
    connection = Connection(
        address=access.address,
        session=job.network.session,
        name=name,
        credentials=credentials,
        heartbeat_s=job.network.heartbeat_s,
        reconnect_max_s=job.network.reconnect_max_s,
        give_up_s=job.network.give_up_s,
        chunk_bytes=job.network.chunk_bytes,
    )
    return Party(parts.trainer, train, evaluation, connection, secure=secure_stages(job, name, access))


def check_secure_cohorts(config: SecAggConfig, smallest: int, largest: int) -> None:
    """A round runs with the cohort's connected parties, at least ``min_parties``: k and t must fit each count
    (a ConfigError naming the key and the count, before anything starts)."""
    check_cohorts(config, smallest, largest)


def secure_server(job: JobConfig, access: Access, kwargs: dict) -> ArbiterServer:
    """The arbiter's server for a job with secure aggregation, which checks adverts' signatures under mTLS."""
    from fedfleet.runtime.grpc.secure_arbiter import SecureArbiterServer
    from fedfleet.runtime.grpc.secure_identity import Verifier

    verifier = None if access.insecure else Verifier(access.certs, party_names(job))
    return SecureArbiterServer(secure_aggregation=job.secure_aggregation, verifier=verifier, **kwargs)


def secure_stages(job: JobConfig, name: str, access: Access) -> SecureStages | None:
    """A party's side of secure rounds (None without secure aggregation): it signs its adverts with its own
    certificate and checks its neighbours' against the job's CA, except on ``--insecure``."""
    if job.secure_aggregation is None:
        return None
    from fedfleet.runtime.grpc.secure_identity import Signer, Verifier
    from fedfleet.runtime.grpc.secure_party import SecureStages

    signer = None if access.insecure else Signer(access.certs, name)
    verifier = None if access.insecure else Verifier(access.certs, party_names(job))
    return SecureStages(job.secure_aggregation, job.network.session, name, party_names(job), job.seed, signer,
                        verifier)  # fmt: skip
