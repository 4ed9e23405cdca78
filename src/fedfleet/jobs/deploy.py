"""A deployed federation built from the same job file a simulation uses: one arbiter, one process per party.

Party ``k`` of ``network.parties`` is client ``k`` of the simulation: with ``network.party_data: shard`` it
trains on shard ``k`` of ``data.partition`` (the demo set-up, which lets a deployed run be checked against
its simulation); with ``whole`` it trains on all of the dataset its own job file names (its private data).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.config.schema import JobConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.data import partition
from fedfleet.data.federated import ClientData
from fedfleet.errors import ConfigError
from fedfleet.jobs.assemble import build_parts, fit_config
from fedfleet.runtime.grpc import ArbiterServer, Connection, GrpcRuntime, Party
from fedfleet.runtime.grpc.tls import ARBITER_NAME, channel_credentials, server_credentials
from fedfleet.select import build_selector
from fedfleet.strategy import build_strategy


@dataclass(frozen=True)
class Access:
    """How a process reaches the others: ``certs`` folder for mTLS, or ``insecure`` plaintext."""

    insecure: bool
    certs: str
    address: str


def access_of(job: JobConfig, insecure: bool = False, certs: str | None = None, address: str | None = None) -> Access:
    net = job.network
    return Access(insecure or net.insecure, certs or net.certs, address or net.address)


def party_names(job: JobConfig) -> list[str]:
    names = list(job.network.parties)
    if not names:
        raise ConfigError("network.parties is empty: list the parties of the session, e.g. [guest-9999, host-10000]")
    return names


@dataclass
class ArbiterJob:
    loop: RoundLoop
    runtime: GrpcRuntime
    server: ArbiterServer


def build_arbiter(job: JobConfig, access: Access) -> ArbiterJob:
    """Every check that can fail, then the (not yet started) server and the round loop that drives it."""
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
    selector = build_selector(job.selector.name, **job.selector.params)
    parts = build_parts(job, clients=len(names))  # the seeded initial model, and the test split for evaluation
    credentials = None if access.insecure else server_credentials(access.certs, ARBITER_NAME)
    server = ArbiterServer(
        session=job.network.session,
        parties=names,
        spec=parts.trainer.params.spec,
        address=access.address,
        credentials=credentials,
        max_weight=job.network.max_weight,
    )
    test = parts.test.to(parts.device) if len(parts.test.y) else None
    runtime = GrpcRuntime(
        server,
        min_parties=min_parties,
        round_timeout=job.network.round_timeout,
        join_timeout=job.network.join_timeout,
        wait_timeout=job.network.wait_timeout,
        chunk_bytes=int(job.network.chunk_mib * (1 << 20)),
        evaluator=(parts.trainer, test) if test is not None else None,
    )
    loop = RoundLoop(
        strategy,
        runtime,
        selector,
        parts.trainer.params.clone().to("cpu"),
        fit_config(job),
        LoopConfig(rounds=job.rounds, cohort=job.cohort, seed=job.seed, eval_every=job.eval_every),
    )
    return ArbiterJob(loop, runtime, server)


def build_party(job: JobConfig, name: str, access: Access) -> Party:
    names = party_names(job)
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
        chunk_bytes=int(job.network.chunk_mib * (1 << 20)),
    )
    return Party(parts.trainer, train, evaluation, connection)
