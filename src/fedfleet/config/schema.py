"""The typed job configuration (one YAML file per job). Defaults are the embedded demo.

Values are checked here (ranges, choices); names of registered things (datasets, models, strategies) and
their parameters are checked when the job is built, still before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fedfleet.config.loader import Named
from fedfleet.core.fit_config import FitConfig
from fedfleet.hpc.sites.site import Site
from fedfleet.privacy.config import PrivacyConfig
from fedfleet.runtime.grpc.settings import SessionSettings
from fedfleet.secagg.config import SecAggConfig


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    # digits | mnist5k | movielens_ctr | csv | npz | synthetic
    dataset: Named = field(default_factory=lambda: Named("digits"))
    test_fraction: float = 0.2  # held out for central evaluation (seeded; by class, or per user for ratings)
    clients: int | None = 100  # virtual clients; None with the `natural` partition (one per user key)
    # iid | dirichlet (alpha) | shards (shards_per_client) | natural (by the dataset's user keys)
    partition: Named = field(default_factory=lambda: Named("dirichlet", {"alpha": 0.5}))

    def __post_init__(self) -> None:
        _positive("data.clients", self.clients)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in [0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class ClientConfig:
    """Local training on each selected client."""

    # the defaults are FitConfig's, so a job file and Simulation.build train alike
    epochs: int = FitConfig.epochs
    steps: int | None = FitConfig.steps  # exactly this many SGD steps instead of epochs
    batch_size: int = FitConfig.batch_size
    lr: float = FitConfig.lr
    optimizer: str = "sgd"  # sgd | adam | adamw | adagrad | rmsprop
    momentum: float = 0.0
    weight_decay: float = 0.0
    # regexes of params that never leave a client, e.g. [embeddings\.user_id]: personal rows kept per client
    keep_local: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive("client.epochs", self.epochs)
        _positive("client.steps", self.steps)
        _positive("client.batch_size", self.batch_size)
        if self.lr <= 0:
            raise ValueError(f"client.lr must be > 0, got {self.lr}; a typical value is 0.01 to 0.1 for SGD")
        _positive("client.momentum", self.momentum, allow_zero=True)
        _positive("client.weight_decay", self.weight_decay, allow_zero=True)


@dataclass(frozen=True)
class RuntimeConfig:
    # simulation: in this process | ray: on a Ray cluster (pip install 'fedfleet[ray]'), the same results |
    # files: `fedfleet arbiter` and the parties exchange rounds through runtime.exchange (docs/file-exchange.md)
    kind: Literal["simulation", "ray", "files"] = "simulation"
    vectorize: Literal["auto", "on", "off"] = "auto"  # the cohort as one batched model; auto: where it wins
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    # torch threads for local training; default: 1 on a CPU for models under 10M params (more spin-wait beside
    # any busy process; on an otherwise idle machine 2+ win for 1-10M params: benchmarks/RESULTS.md)
    threads: int | None = None
    # kind: ray only
    workers: int | None = None  # Ray actors training shares of the cohort (default: one per free CPU)
    address: str | None = None  # join this Ray cluster ("auto", "ray://head:10001"); default: start one here
    cpus_per_worker: float | None = None  # default 1; also each worker's torch threads
    gpus_per_worker: float | None = None  # default 1 when runtime.device is a GPU, else 0; fractions share one
    # kind: files only
    exchange: str | None = None  # the shared folder of the rounds' global models and updates
    keep_last: int | None = None  # the arbiter removes its own files of older rounds (default: keeps all)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"runtime.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        ray_only = [k for k in ("workers", "address", "cpus_per_worker", "gpus_per_worker") if getattr(self, k)]
        if ray_only and self.kind != "ray":
            raise ValueError(f"runtime.{ray_only[0]} applies to runtime.kind: ray only (kind is {self.kind!r})")
        files_only = [k for k in ("exchange", "keep_last") if getattr(self, k) is not None]
        if files_only and self.kind != "files":
            raise ValueError(f"runtime.{files_only[0]} applies to runtime.kind: files only (kind is {self.kind!r})")
        if self.kind == "files" and not self.exchange:
            raise ValueError("runtime.kind: files needs runtime.exchange: the folder the sites share")
        _positive("runtime.keep_last", self.keep_last)
        _positive("runtime.workers", self.workers)
        _positive("runtime.threads", self.threads)
        _positive("runtime.cpus_per_worker", self.cpus_per_worker)
        _positive("runtime.gpus_per_worker", self.gpus_per_worker, allow_zero=True)


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str = "test_accuracy"
    mode: Literal["max", "min"] = "max"
    patience: int = 10  # evaluations without improvement
    min_delta: float = 0.0


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"  # the run lands in <dir>/<name>/
    checkpoint_every: int = 10  # rounds; the last round is always saved
    tensorboard: bool = True
    progress: bool = True
    early_stopping: EarlyStoppingConfig | None = None

    def __post_init__(self) -> None:
        _positive("output.checkpoint_every", self.checkpoint_every)


@dataclass(frozen=True)
class NetworkConfig(SessionSettings):
    """A deployed federation: ``fedfleet arbiter`` and ``fedfleet party`` (ignored by ``simulate``). Every key
    of ``SessionSettings`` (address, session, certs, min_parties, round_timeout, ...) with its defaults, and:"""

    parties: tuple[str, ...] = ()  # the allowed parties (certificate names, e.g. guest-9999); order = client ids
    insecure: bool = False  # plaintext (trusted networks only); takes --insecure on the command line as well
    party_data: Literal["shard", "whole"] = "shard"  # shard: party k takes client k of data.partition
    # the arbiter evaluates the global model on the job's test split; false: it never loads the dataset (the
    # data are the parties'), takes the seeded initial model from the first party and reports their evaluation
    central_eval: bool = True

    key_prefix: ClassVar[str] = "network."

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.parties)) != len(self.parties):
            raise ValueError("network.parties lists a party twice")
        for name in self.parties:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"network.parties: {name!r} is not a valid party name (e.g. guest-9999)")
        if self.certs is None and not self.insecure:
            raise ValueError("network.certs is empty: name the certificate folder, or set network.insecure: true")


@dataclass(frozen=True)
class SystemConfig:
    """Simulated devices, networks and availability (FedScale-style); deployed runs ignore it.

    traces: generate (seeded lognormal devices and diurnal availability; online_fraction, compute_median_s,
    download_median_bps, upload_median_bps, availability: false, ...) | fedscale (device_conf_file,
    device_avail_file: FedScale's client_device_capacity and client_behave_trace pickles, assign: cycle | exact).
    round_end: all (wait for every client) | deadline (seconds) | overcommit (factor, deadline): select
    cohort x (1 + factor) and keep the first cohort updates.
    """

    traces: Named = field(default_factory=lambda: Named("generate"))
    round_end: Named = field(default_factory=lambda: Named("all"))
    target_accuracy: float | None = None  # report the simulated seconds until test_accuracy first reaches it

    def __post_init__(self) -> None:
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"system.target_accuracy must be in (0, 1], got {self.target_accuracy}")


@dataclass(frozen=True)
class FedBuffConfig:
    """Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022) instead of synchronous rounds.

    ``concurrency`` clients train at once (default: cohort), each from the model current when it starts; every
    ``buffer`` arrivals the strategy's server step applies their mean (so ``strategy`` still picks FedAvg's
    server_lr, FedYogi, ...), and ``rounds`` counts these server steps. Each arrival is scaled by its staleness
    s (server steps since it started): polynomial (exponent; default 0.5, i.e. 1 / sqrt(1 + s)) | constant |
    hinge (a, b). Arrivals more than ``max_staleness`` steps old are discarded (default: none are).
    """

    buffer: int = 10
    concurrency: int | None = None
    staleness: Named = field(default_factory=lambda: Named("polynomial"))
    weight_by_examples: bool = True  # also weight each arrival by its examples, as FedAvg does
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        _positive("fedbuff.buffer", self.buffer)
        _positive("fedbuff.concurrency", self.concurrency)
        _positive("fedbuff.max_staleness", self.max_staleness, allow_zero=True)


@dataclass(frozen=True)
class TransformsConfig:
    """The aggregation pipeline's transforms, in order (``fedfleet list client-transforms``): ``client`` on each
    party's update before it is sent, ``server`` on the arbiter around the fold, e.g.
    ``client: [{name: clip, max_norm: 1.0}]``."""

    client: tuple[Named, ...] = ()
    server: tuple[Named, ...] = ()


@dataclass(frozen=True)
class JobConfig:
    name: str = "digits-fedavg"
    seed: int = 0
    rounds: int = 100
    cohort: int = 10  # clients selected per round
    eval_every: int = 5  # central evaluation every k rounds and after the last; 0 = never
    selector: Named = field(default_factory=lambda: Named("uniform"))
    data: DataConfig = field(default_factory=DataConfig)
    model: Named = field(default_factory=lambda: Named("simple_cnn", {"padding": 1}))
    strategy: Named = field(default_factory=lambda: Named("fedavg"))
    client: ClientConfig = field(default_factory=ClientConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    system: SystemConfig | None = None  # simulate device speeds, networks and availability (traces)
    fedbuff: FedBuffConfig | None = None  # asynchronous buffered aggregation instead of rounds (simulate only)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)  # clip, ... around the aggregation
    imports: tuple[str, ...] = ()  # the user's modules, imported first: they register models, datasets, ...
    # SecAgg+: the arbiter learns only each round's weighted sum (neighbours, threshold, clip, bits, max_weight)
    secure_aggregation: SecAggConfig | None = None
    # (epsilon, delta) differential privacy: clipping, noise, an accountant (docs/differential-privacy.md)
    privacy: PrivacyConfig | None = None
    # facilities as parties: each site's scheduler, reach and directives; `fedfleet sites run` submits one batch
    # job per selected site per round over runtime.kind: files, or one per site dialling the arbiter (docs/hpc.md)
    sites: tuple[Site, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_' or '-' (it names the run folder)")
        _positive("rounds", self.rounds)
        _positive("cohort", self.cohort)
        _positive("eval_every", self.eval_every, allow_zero=True)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.fedbuff is not None and self.system is not None and self.system.round_end.name != "all":
            raise ValueError(
                f"system.round_end {self.system.round_end.name!r} ends synchronous rounds, but with fedbuff a server "
                f"step ends after fedbuff.buffer arrivals; remove system.round_end"
            )
        if self.secure_aggregation is not None:
            if self.fedbuff is not None:
                raise ValueError(
                    "secure_aggregation unmasks a round's sum at once, fedbuff folds arrivals one by one: drop one"
                )
            self.secure_aggregation.validate(self.cohort)  # k, t, bits for this cohort: the message names the key
        if self.fedbuff is not None and self.runtime.kind != "simulation":
            raise ValueError(
                f"fedbuff trains each client as it is dispatched, in this process; runtime.kind {self.runtime.kind!r} "
                f"is not supported with it yet: use runtime.kind: simulation"
            )
        if self.privacy is not None:
            check_privacy(self)
        if self.sites:
            check_sites(self)


def check_sites(job: JobConfig) -> None:
    names = [site.name for site in job.sites]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"sites: {', '.join(twice)} listed twice (one entry per party)")
    strangers = [n for n in names if n not in job.network.parties]
    if strangers:
        raise ValueError(
            f"sites: {', '.join(strangers)} not in network.parties ({', '.join(job.network.parties) or 'empty'}): a "
            "site runs one party of the session"
        )
    if job.runtime.kind == "ray":
        raise ValueError(
            "sites are parties of a deployed session: with runtime.kind: files one batch job per site per round "
            "exchanges through a folder; without it (gRPC) one job per site dials network.address; not ray"
        )


def check_privacy(job: JobConfig) -> None:
    """What a privacy section needs of the rest of the job; each refusal names the key to change."""
    p = job.privacy
    if job.fedbuff is not None:
        raise ValueError("privacy accounts synchronous rounds; fedbuff's asynchronous steps are not covered: drop one")
    if p.where == "central" and job.secure_aggregation is not None:
        raise ValueError(
            "privacy.where: central noises at the arbiter, which must see each clipped update; with "
            "secure_aggregation use privacy.where: distributed (each party adds its share of the noise)"
        )
    if p.where == "distributed" and job.secure_aggregation is None:
        raise ValueError(
            "privacy.where: distributed splits the noise over the parties, which only protects them when the "
            "arbiter sees just the sum: add a secure_aggregation section (or use where: central or local)"
        )
    if p.where == "central" and job.transforms.server:
        names = ", ".join(n.name for n in job.transforms.server)
        raise ValueError(
            f"privacy.where: central bounds each update's influence on the mean; transforms.server ({names}) would "
            "change that mean (a robust rule's sensitivity is not the mean's): drop one of them"
        )
    if job.selector.name != "uniform":
        raise ValueError(
            f"privacy: the accountant assumes clients drawn at random, but selector {job.selector.name!r} picks "
            "them by what they reported (not private): use selector: uniform"
        )
    if job.system is not None and p.sampling != "none":
        raise ValueError(
            f"privacy.sampling: {p.sampling} assumes a uniform draw from all data.clients, but system traces decide "
            "who is online and whose update is kept: set privacy.sampling: none (no amplification by sampling)"
        )
