"""A federation exchanged through a shared folder (``runtime.kind: files``), built from the same job file.

The session's names, ``min_parties`` and ``round_timeout`` come from the ``network:`` section as for gRPC (its
address and certificates are not used); the folder from ``runtime.exchange``. Party ``k`` of ``network.parties``
is client ``k`` of the simulation, on shard ``k`` of ``data.partition`` (``network.party_data: shard``) or on all of
its own dataset (``whole``), as in ``jobs/deploy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedfleet.config.schema import JobConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.errors import ConfigError
from fedfleet.jobs.assemble import build_parts, fit_config, pipeline_of, selector_of
from fedfleet.jobs.deploy import party_names
from fedfleet.runtime.files import FileParty, FileRuntime
from fedfleet.runtime.grpc.wire import JoinMode
from fedfleet.strategy import build_strategy


@dataclass
class FileArbiter:
    runtime: FileRuntime
    loop: RoundLoop


def _check(job: JobConfig) -> list[str]:
    if job.runtime.kind != "files" or job.runtime.exchange is None:
        raise ConfigError("this job exchanges through a folder only with runtime.kind: files and runtime.exchange")
    if job.fedbuff is not None or job.secure_aggregation is not None:
        raise ConfigError("runtime.kind: files runs plain synchronous rounds: remove fedbuff / secure_aggregation")
    names = party_names(job)
    if job.cohort > len(names):
        raise ConfigError(f"cohort {job.cohort} is larger than the {len(names)} parties in network.parties")
    return names


def build_file_arbiter(job: JobConfig, runtime_class: type[FileRuntime] = FileRuntime, **extra: Any) -> FileArbiter:
    """The round loop over a FileRuntime (or ``runtime_class``, given ``extra`` keywords: the sites' runtime),
    with the job's seeded initial model and central evaluation."""
    names = _check(job)
    min_parties = job.network.min_parties or job.cohort
    if min_parties > job.cohort:
        raise ConfigError(f"network.min_parties {min_parties} is larger than the cohort {job.cohort}")
    parts = build_parts(job, clients=len(names))
    test = parts.test.to(parts.device) if len(parts.test.y) else None
    runtime = runtime_class(
        job.runtime.exchange,
        session=job.network.session,
        parties=names,
        min_parties=min_parties,
        round_timeout=job.network.round_timeout_s(JoinMode.TASKS),
        keep_last=job.runtime.keep_last,
        max_weight=job.network.max_weight,
        max_update_norm=job.network.max_update_norm,
        evaluator=(parts.trainer, test) if test is not None else None,
        **extra,
    )
    loop = RoundLoop(
        build_strategy(job.strategy.name, **job.strategy.params),
        runtime,
        selector_of(job),
        parts.trainer.params.clone().to("cpu"),
        fit_config(job),
        LoopConfig(rounds=job.rounds, cohort=job.cohort, seed=job.seed, eval_every=job.eval_every),
        pipeline=pipeline_of(job, len(names)),
    )
    return FileArbiter(runtime, loop)


def build_file_party(job: JobConfig, name: str, timeout: float | None = None, poll_s: float = 1.0) -> FileParty:
    """Party ``name``'s trainer and data over the job's exchange folder; ``timeout``: how long it waits for a
    round's global model (default ``network.wait_timeout``)."""
    names = _check(job)
    if name not in names:
        raise ConfigError(f"party {name!r} is not in network.parties ({', '.join(names)})")
    if job.network.party_data == "shard":
        parts = build_parts(job, clients=len(names))
        data = parts.federation.client(names.index(name))
    else:
        parts = build_parts(job, clients=1)
        data = parts.federation.client(0)
    wait = timeout if timeout is not None else job.network.wait_timeout
    return FileParty(job.runtime.exchange, name, parts.trainer, data, session=job.network.session, timeout=wait,
                     poll_s=poll_s)  # fmt: skip
