"""The simulation scaled out on a Ray cluster: Ray actors train the cohort, the round loop stays in the driver.

Each worker is a Ray actor with its own CPUs (and GPU share, when asked), one trainer built once from a copy
of the driver's model, and the federation and test data put once in Ray's object store (workers on one node
share that memory). Each round:

1. the global params go to the object store once (``ray.put``), and every worker gets a reference;
2. the cohort is cut into contiguous runs of about equal work (examples, or steps), one per worker;
3. each worker trains its clients in turn with the single-process code (``make_runtime``) and the same
   per-client seeds;
4. given the job's strategy, a worker folds its clients with the strategy's own aggregator (any strategy:
   aggregators ``merge``) and sends that one unfinished, model-sized partial; without one (FedBuff, which
   weighs each arrival by its staleness) it sends one delta per client;
5. the driver yields the partials (``core.update.Partial``, with a report per client for the virtual clock
   and the selector) or the updates worker after worker, in cohort order, so the same seed gives the same
   model run after run.

A worker that dies (node lost, process killed, out of memory) is replaced by a new actor and its share of
the round is trained again; the results are identical, because training is a pure function of the global
params, the clients and their seeds. After ``max_replacements`` deaths in one round, :class:`WorkerLostError`
ends the run with the cause.

Params a trainer keeps per client (``client.keep_local``) live in the worker that trains the client, so then
client c always goes to worker c mod workers (no balancing), and the central evaluation gathers every
worker's rows; checkpoints carry them. A replaced worker's clients start again from their initial rows.

Differences from the single-process runtime: float sums are grouped per worker (agreement to rounding, not
bit for bit), and state a model keeps beside its exchanged params (BatchNorm statistics) evolves per worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.client.local_params import load_local_state, rows_state
from fedfleet.client.torch_trainer import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import EMPTY, Pipeline
from fedfleet.core.update import Partial, Report, Update
from fedfleet.errors import ConfigError, UserError
from fedfleet.runtime.ray.ship import land, ship
from fedfleet.runtime.ray.worker import TrainerFactory, Worker, WorkerResult, land_params
from fedfleet.runtime.sim import VECTORIZE_MODES

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fedfleet[ray]' (or pip install ray)"


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"runtime.kind is 'ray' but Ray is not installed; install it with: {INSTALL_HINT}") from None
    return ray


class WorkerLostError(RuntimeError):
    """Ray workers kept dying in one round; the message names the worker and the last cause."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray runtime runs."""

    workers: int | None = None  # None: as many as the cluster's CPUs (and GPUs) allow
    address: str | None = None  # None: a local Ray with the CPUs the workers need; else "auto", "ray://host:10001"
    cpus_per_worker: float = 1.0  # also the worker's torch threads
    gpus_per_worker: float = 0.0  # > 0: workers train on a CUDA device (fractions share one GPU)
    vectorize: str = "auto"  # how each worker trains its share: as ``make_runtime`` (auto: where it wins)
    max_replacements: int = 3  # dead workers replaced within one round before the run fails
    start_timeout: float = 300.0  # seconds for every worker to start (Ray queues actors for busy resources)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.vectorize not in VECTORIZE_MODES:
            raise ValueError(f"vectorize must be one of {VECTORIZE_MODES}, got {self.vectorize!r}")
        if self.max_replacements < 0:
            raise ValueError(f"max_replacements must be >= 0, got {self.max_replacements}")
        if not self.start_timeout > 0:
            raise ValueError(f"start_timeout must be > 0 seconds, got {self.start_timeout}")


class RayRuntime:
    """The :class:`~fedfleet.core.loop.Runtime` on Ray. Ray and the workers start at the first round.

    ``strategy``: the strategy whose aggregator folds this runtime's updates; the workers then fold their share
    with it and send the partial. Without it they send one delta per client (FedBuff weighs each one).
    An already initialised Ray session (``ray.init`` by the caller) is used as it is and left running.
    """

    parties_in_process = True  # secure aggregation can play the parties here (secagg.in_process)

    def __init__(
        self,
        trainer: TorchTrainer,
        federation: Any,
        test_data: Any = None,
        *,
        strategy: Any = None,
        options: RayOptions | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self._ray = require_ray()
        self.options = options or RayOptions()
        self.federation = federation
        self.test_data = test_data
        self.strategy = strategy
        self.pipeline = pipeline or EMPTY  # its fold transforms run where the updates are folded
        self._factory = TrainerFactory.from_trainer(trainer)  # now: the model as it is when the runtime is made
        # params kept per client (client.keep_local) live in the trainer that trained the client: every
        # client then always goes to the same worker, and evaluation gathers every worker's rows
        self._sticky = trainer.local is not None
        self._local = trainer.local  # the driver's copy: checks a checkpoint's rows against the model
        self._restored_rows: dict[Any, Any] | None = None  # from a checkpoint, for the workers when they start
        self._sizes = [float(s) for s in federation.sizes().tolist()]
        self._started_ray = False
        self._actor: Any = None
        self._refs: tuple[Any, Any, Any] | None = None  # factory, federation, test data in the object store
        self._threads = max(1, int(self.options.cpus_per_worker))  # torch threads per worker: its CPUs
        self._device = "cuda" if self.options.gpus_per_worker > 0 else "cpu"
        self.workers: list[Any] = []
        self._metrics: dict[str, float] = {}

    @property
    def population(self) -> int:
        return self.federation.num_clients

    # -- start and stop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to (or start) Ray and start the workers; the first ``fit`` does it if you do not."""
        if self.workers:
            return
        ray, opts = self._ray, self.options
        if not ray.is_initialized():
            if opts.address is None:
                cpus = math.ceil((opts.workers or os.cpu_count() or 1) * opts.cpus_per_worker)
                ray.init(num_cpus=cpus, include_dashboard=False)
            else:
                ray.init(address=opts.address)
            self._started_ray = True
        try:
            count = self._worker_count()
            self._actor = ray.remote(Worker).options(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker)
            self._refs = (
                ray.put(ship(self._factory)),
                ray.put(ship(self.federation.to("cpu"))),
                ray.put(ship(self.test_data)) if self.test_data is not None else None,
            )
            self.workers = [self._spawn() for _ in range(count)]
            self._await_workers()
            self._push_restored_rows()
        except BaseException:
            self.close()
            raise
        log.info("Ray runtime: %d workers x %g CPU, %g GPU", count, opts.cpus_per_worker, opts.gpus_per_worker)

    def close(self) -> None:
        """Stop the workers, and Ray itself if this runtime started it."""
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []
        self._refs = None  # the object store may free the data
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Runtime protocol ----------------------------------------------------------------------------
    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update | Partial]:
        self.start()
        partial = (self.strategy, self.pipeline) if self.partial_sums else None  # None: one delta per client
        params_ref = self._ray.put(ship(global_params))  # once per round, whatever the number of workers
        shares = self._shares([int(c) for c in clients], config)
        self._metrics = {"workers": float(sum(1 for s in shares if s)), "workers_replaced": 0.0}
        calls = {
            i: (lambda worker, share=share: worker.fit.remote(params_ref, share, config, partial))
            for i, share in enumerate(shares)
            if share
        }
        pending = {i: call(self.workers[i]) for i, call in calls.items()}  # every worker starts now
        for i, call in calls.items():  # answers in worker order: the same fold order in every run
            result: WorkerResult = self._result(i, pending[i], call, config.round)
            yield from self._updates(result, global_params)

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        if self.test_data is None:
            return {}
        self.start()
        params_ref = self._ray.put(ship(global_params))
        others = range(1, len(self.workers)) if self._sticky else range(0)
        # with per-client params, worker 0 evaluates with every other worker's clients' rows as well
        rows = [self._result(i, _local_rows(self.workers[i]), _local_rows, None) for i in others]

        def call(worker: Any) -> Any:
            return worker.evaluate.remote(params_ref, *rows)

        return self._result(0, call(self.workers[0]), call, None)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The rows every worker's clients keep (``client.keep_local``); nothing without it."""
        if self._local is None:
            return {}
        if not self.workers:  # not started since a restore: the restored rows are the state
            return rows_state(self._restored_rows or {})
        rows: dict[Any, Any] = {}
        for i, worker in enumerate(self.workers):  # disjoint: each client is trained by one worker only
            rows.update(land(self._result(i, _local_rows(worker), _local_rows, None)))
        return rows_state(rows)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._local is None:
            load_local_state(None, state)  # refuses rows this job would not keep
            return
        self._restored_rows = self._local.rows_from(state)
        if self.workers:
            self._push_restored_rows()

    def _push_restored_rows(self) -> None:
        """Each worker gets the restored rows of its clients (client c trains on worker c mod workers)."""
        if self._restored_rows is None:
            return
        n, rows = len(self.workers), self._restored_rows
        shares = [{c: tables for c, tables in rows.items() if c % n == k} for k in range(n)]
        self._get([w.set_local_rows.remote(ship(share)) for w, share in zip(self.workers, shares, strict=True)])
        self._restored_rows = None

    # -- internals -----------------------------------------------------------------------------------
    @property
    def partial_sums(self) -> bool:
        """Whether the workers send partial aggregates (a strategy was given, and its fold transforms act on each
        update alone) or one delta per client."""
        return self.strategy is not None and self.pipeline.mergeable

    def _shares(self, clients: list[int], config: FitConfig) -> list[list[int]]:
        workers = len(self.workers)
        if self._sticky:
            return [[c for c in clients if c % workers == k] for k in range(workers)]
        costs = [float(config.steps) if config.steps else self._sizes[c] for c in clients]  # ~ training time
        return split_cohort(clients, costs, workers)

    def _updates(self, result: WorkerResult, like: FlatParams) -> Iterator[Update | Partial]:
        """The worker's answer: its partial aggregate, or one update per client."""
        if result.partial is not None:
            aggregator = land(result.partial, writable=True)
            _check_partial(aggregator, like)
            yield Partial(aggregator, [Report(r.client_id, r.weight, r.metrics, r.stats) for r in result.records])
            return
        for shipped, rec in zip(result.params, result.records, strict=True):
            params = land_params(shipped, like)
            yield Update(
                params, rec.weight, rec.metrics, client_id=rec.client_id, is_delta=rec.is_delta, stats=rec.stats
            )

    def _result(self, index: int, ref: Any, call: Callable[[Any], Any], rnd: int | None) -> Any:
        """Worker ``index``'s answer; a dead worker is replaced and ``call`` runs again on the new one."""
        exceptions = self._ray.exceptions
        for attempt in range(self.options.max_replacements + 1):
            try:
                return self._get(ref)
            except exceptions.RayActorError as exc:
                where = f"round {rnd + 1}" if rnd is not None else "evaluation"
                if attempt == self.options.max_replacements:
                    raise WorkerLostError(
                        f"Ray worker {index} died {attempt + 1} time(s) in {where}; last cause: {exc}"
                    ) from exc
                log.warning(
                    "Ray worker %d died in %s (%s); starting a new one and running its share again",
                    index,
                    where,
                    str(exc).splitlines()[0],
                )
                self._replace(index)
                self._metrics["workers_replaced"] = self._metrics.get("workers_replaced", 0.0) + 1
                ref = call(self.workers[index])
        raise AssertionError("unreachable")

    def _await_workers(self) -> None:
        """Every worker up within ``start_timeout``, or an error naming what they wait for: Ray queues an
        actor whose CPUs (or GPUs) other jobs hold, and would wait for them forever."""
        opts = self.options
        refs = [w.ready.remote() for w in self.workers]
        ready, waiting = self._ray.wait(refs, num_returns=len(refs), timeout=opts.start_timeout)
        if waiting:
            free = self._ray.available_resources()
            gpus = f" and {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker else ""
            raise ConfigError(
                f"{len(ready)} of {len(refs)} Ray workers started within {opts.start_timeout:g} s; the others wait "
                f"for {opts.cpus_per_worker:g} CPU{gpus} each, which other jobs hold (free now: "
                f"{free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs). Lower runtime.workers, wait for the "
                "other jobs, or raise RayOptions.start_timeout"
            )
        self._get(refs)  # a worker that could not start fails here with its own error

    def _get(self, ref: Any) -> Any:
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            # the user's own mistakes (a diverged loss, bad data) keep their one-line message
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise

    def _spawn(self) -> Any:
        factory, federation, test = self._refs
        return self._actor.remote(factory, federation, test, self._threads, self._device, self.options.vectorize)

    def _replace(self, index: int) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to stop
            self._ray.kill(self.workers[index])  # it may be unreachable rather than dead
        self.workers[index] = self._spawn()

    def _worker_count(self) -> int:
        opts = self.options
        resources = self._ray.cluster_resources()

        def fits(res: dict[str, float]) -> int:
            cpus = int(res.get("CPU", 0) // opts.cpus_per_worker)
            return min(cpus, int(res.get("GPU", 0) // opts.gpus_per_worker)) if opts.gpus_per_worker else cpus

        free = fits(self._ray.available_resources())  # other jobs (or runtimes) may hold some
        count = opts.workers if opts.workers is not None else max(free, 1)
        if count > free:
            log.warning("%d Ray workers asked for, %d fit in the free resources: the rest wait for them", count, free)
        if count > fits(resources):
            raise ConfigError(
                f"runtime.workers={count} needs {count * opts.cpus_per_worker:g} CPUs and "
                f"{count * opts.gpus_per_worker:g} GPUs, but the Ray cluster has {resources.get('CPU', 0):g} CPUs "
                f"and {resources.get('GPU', 0):g} GPUs; lower runtime.workers or the per-worker resources"
            )
        return count


def split_cohort(clients: Sequence[int], costs: Sequence[float], parts: int) -> list[list[int]]:
    """The cohort cut into ``parts`` contiguous runs of about equal total cost (some may be empty).

    Contiguous, so that the worker-by-worker fold keeps the cohort's order; each client goes to the run that
    holds the midpoint of its cost on the cumulative scale.
    """
    if not clients:
        return [[] for _ in range(parts)]
    cost = np.asarray(costs, dtype=np.float64)
    total = float(cost.sum())
    if total <= 0:
        cost, total = np.ones(len(clients)), float(len(clients))
    middle = np.cumsum(cost) - cost / 2
    owner = np.minimum((middle * parts / total).astype(np.int64), parts - 1)
    return [[c for c, o in zip(clients, owner, strict=True) if o == k] for k in range(parts)]


def _local_rows(worker: Any) -> Any:
    return worker.local_rows.remote()


def _check_partial(aggregator: Any, like: FlatParams) -> None:
    """A partial's buffers have the global params' layout and live on their device (a worker may use a GPU)."""
    for name, value in vars(aggregator).items():
        if isinstance(value, FlatParams):
            if value.spec != like.spec:
                raise ValueError(f"a Ray worker sent a partial of layout {value.spec}, expected {like.spec}")
            if value.device != like.device:
                setattr(aggregator, name, value.to(like.device))
