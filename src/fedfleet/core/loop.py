"""The one round loop. Every runtime (in-process simulation, Ray, gRPC) is driven by it.

    configure -> plan (who checked in, select, who will finish in time) -> execute on the runtime
    -> aggregate (streaming, inside the pipeline's fold transforms) -> server step -> evaluate
    -> tell the selector -> callbacks

The loop owns the server state (global params, strategy state, round, virtual clock) and nothing else:
the maths is the strategy's, the transport is the runtime's, who trains is the planner's
(``core.round_plan``: with system traces a round is planned before anyone trains, so a dropped client
costs no wall time), side effects are callbacks'. ``core.async_loop`` is the asynchronous variant (FedBuff):
the same surface, one record per server step.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from fedfleet.core.aggregate import Aggregator
from fedfleet.core.clock import VirtualClock
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import EMPTY, AggregationContext, Pipeline
from fedfleet.core.round_end import RoundEnd, RoundFeedback
from fedfleet.core.round_plan import Heard, RoundPlan, RoundPlanner, reported_loss
from fedfleet.core.signals import deferred_interrupt
from fedfleet.core.update import Aggregate, Partial, TrainStats, Update
from fedfleet.errors import ConfigError, RoundFailedError

log = logging.getLogger(__name__)


class RoundIncomplete(RuntimeError):
    """The runtime could not collect enough updates for a round; the loop runs the round again."""


class StrategyLike(Protocol):
    def configure_fit(self, config: FitConfig) -> FitConfig: ...
    def init_state(self, global_params: FlatParams) -> dict[str, FlatParams]: ...
    def aggregator(self, global_params: FlatParams) -> Aggregator: ...
    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: dict[str, FlatParams]) -> None: ...


class SelectorLike(Protocol):
    """``select`` may also take ``available=`` (sorted indices of the clients checked in now) and the selector
    may have ``observe(round, feedback: RoundFeedback)``, called after each committed round."""

    def select(self, population: int, k: int, round: int, seed: int) -> np.ndarray: ...


class Stateful(Protocol):
    """A selector or runtime whose state a checkpoint must carry. ``state_dict`` is a flat dict of arrays
    (NumPy or torch) and JSON values; ``load_state_dict`` gets it back with the arrays as CPU tensors."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Runtime(Protocol):
    """Executes a round's training on the selected parties and yields their updates as they arrive, or
    partial aggregates (``Partial``) of updates it folded where they were trained."""

    @property
    def population(self) -> int: ...

    def fit(
        self, global_params: FlatParams, clients: Sequence[int], config: FitConfig
    ) -> Iterator[Update | Partial]: ...

    def evaluate(self, global_params: FlatParams) -> dict[str, float]: ...

    def round_metrics(self) -> dict[str, float]:
        """Counters of the last ``fit`` (rejected updates, lost parties, ...), merged into the round's metrics."""
        ...


class Callback:
    """Side effects of the loop. Override what you need; ``loop.request_stop()`` ends the run early."""

    def on_run_start(self, loop: RoundLoop) -> None: ...

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None: ...

    def on_run_end(self, loop: RoundLoop, status: str) -> None: ...


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopConfig:
    rounds: int
    cohort: int
    seed: int = 0
    eval_every: int = 1  # central evaluation every k rounds (and after the last round); 0 = never
    max_attempts: int = 3  # a round the runtime reports incomplete is run again, at most this many times
    target: float | None = None  # report the simulated and wall seconds until target_metric first reaches it
    target_metric: str = "test_accuracy"
    target_mode: str = "max"  # max: reached at >= target; min: at <= target


_REACHED = {"max": operator.ge, "min": operator.le}


class RoundLoop:
    unit: ClassVar[str] = "round"  # what one record is: a synchronous round

    def __init__(
        self,
        strategy: StrategyLike,
        runtime: Runtime,
        selector: SelectorLike,
        global_params: FlatParams,
        fit_config: FitConfig,
        config: LoopConfig,
        callbacks: Sequence[Callback] = (),
        clock: VirtualClock | None = None,
        round_end: RoundEnd | None = None,
        client_sizes: np.ndarray | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        """``client_sizes`` (examples per client) lets the loop plan rounds before training; ``round_end``
        (default: wait for all) then decides whose updates count. ``pipeline``: the fold transforms around the
        strategy's aggregator (``core.pipeline``; its party-side chain is the trainers')."""
        if config.cohort > runtime.population:
            raise ValueError(f"cohort {config.cohort} is larger than the population of {runtime.population}")
        if config.target_mode not in _REACHED:
            raise ValueError(f"target_mode must be one of {sorted(_REACHED)}, got {config.target_mode!r}")
        # a runtime either plays the parties in process (the in-process sum masks for them) or runs the protocol
        # with them itself and yields the unmasked sum (secure_aggregation_native: the gRPC arbiter's rounds)
        self._secure_native = bool(getattr(runtime, "secure_aggregation_native", False))
        in_process = getattr(runtime, "parties_in_process", False)
        if pipeline is not None and pipeline.secure is not None and not (in_process or self._secure_native):
            # the in-process sum would see each update at the arbiter: refuse rather than pretend to be secure
            raise ConfigError(
                f"secure aggregation is not available on {type(runtime).__name__} (it runs in the simulation, an "
                "in-process LocalFederation and the gRPC arbiter's server-driven rounds); turn it off for this runtime"
            )
        traces = clock.traces if clock is not None else None
        if traces is not None and traces.num_clients != runtime.population:
            raise ValueError(
                f"the system traces cover {traces.num_clients} clients but the runtime has {runtime.population}"
            )
        self.strategy = strategy
        self.runtime = runtime
        self.selector = selector
        self.global_params = global_params
        self.fit_config = fit_config
        self.config = config
        self.callbacks = list(callbacks)
        self.pipeline = pipeline or EMPTY
        self.clock = clock or VirtualClock()
        self.planner = RoundPlanner(
            selector, self.clock, runtime.population, config.cohort, config.seed, round_end, client_sizes
        )
        self.state = strategy.init_state(global_params)
        self.round = 0  # the next round to run; rounds [0, self.round) are committed
        self.history: list[RoundRecord] = []
        self.wall_time = 0.0  # wall seconds of the committed rounds
        self.time_to_target: dict[str, float] | None = None  # round, sim_time_s, wall_time_s at the target
        self._stop = False

    # -- state that checkpoints carry ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "global": self.global_params,
            "state": self.state,
            "round": self.round,
            "sim_time": self.clock.now,
            "seed": self.config.seed,
            "history": [dataclasses.asdict(r) for r in self.history],
            "parts": {name: part.state_dict() for name, part in self.stateful_parts().items()},
        }

    def stateful_parts(self) -> dict[str, Stateful]:
        """The parts with state of their own that a resumed run needs, e.g. Oort's memory of every client,
        or the rows clients keep locally (``client.keep_local``)."""
        parts: dict[str, Any] = {"selector": self.selector, "runtime": self.runtime}
        if self.pipeline.stateful:  # a fold transform that remembers rounds (centered clipping's centre)
            parts["pipeline"] = self.pipeline
        return {name: part for name, part in parts.items() if hasattr(part, "state_dict")}

    def restore(self, snap: dict[str, Any]) -> None:
        saved, parts = snap.get("parts", {}), self.stateful_parts()
        for name, part in parts.items():
            if name in saved:
                part.load_state_dict(saved[name])
            else:
                log.warning("the checkpoint holds no %s state: it starts afresh", name)
        for name in saved.keys() - parts.keys():
            if saved[name]:  # e.g. Oort's memory, resumed with a selector that keeps none
                log.warning("this job's %s keeps no state: the checkpoint's is left unused", name)
        self.global_params.copy_(snap["global"])
        for key, value in snap["state"].items():
            self.state[key].copy_(value)
        self.round = int(snap["round"])
        self.clock.now = float(snap["sim_time"])
        self.history = [RoundRecord(**r) for r in snap.get("history", [])]
        self.wall_time = sum(r.metrics.get("wall_s", 0.0) for r in self.history)
        reached = [r for r in self.history if "sim_time_to_target_s" in r.metrics]
        self.time_to_target = None
        if reached:
            m = reached[0].metrics
            self.time_to_target = {
                "round": float(reached[0].round),
                "sim_time_s": m["sim_time_to_target_s"],
                "wall_time_s": m.get("wall_time_to_target_s", 0.0),
            }

    def request_stop(self) -> None:
        self._stop = True

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> list[RoundRecord]:
        status = "failed"
        for cb in self.callbacks:
            cb.on_run_start(self)
        try:
            while self.round < self.config.rounds and not self._stop:
                record = self._run_round_with_retries(self.round)
                for cb in self.callbacks:
                    cb.on_round_end(self, record)
            status = "stopped" if self._stop and self.round < self.config.rounds else "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            for cb in self.callbacks:
                cb.on_run_end(self, status)
        return self.history

    def _run_round_with_retries(self, rnd: int) -> RoundRecord:
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return self.run_round(rnd)
            except RoundIncomplete as exc:
                if attempt == self.config.max_attempts:
                    raise RoundFailedError(f"{exc}; gave up after {attempt} attempts") from exc
                log.warning(
                    "%s; running round %d again (attempt %d of %d)", exc, rnd + 1, attempt + 1, self.config.max_attempts
                )
        raise AssertionError("unreachable")

    def run_round(self, rnd: int) -> RoundRecord:
        """Train, fold and commit round ``rnd``; afterwards ``self.round == rnd + 1``."""
        wall = time.perf_counter()
        config = self.strategy.configure_fit(dataclasses.replace(self.fit_config, round=rnd, seed=self.config.seed))
        plan = self.planner.plan(rnd, config, self.global_params.nbytes)
        context = self._context(rnd, plan)
        aggregator = self.pipeline.aggregator(self.strategy, self.global_params, context, self._secure_native)
        download = self.global_params.nbytes
        heard: Heard = {}
        for item in self.runtime.fit(self.global_params, plan.train, config):
            if isinstance(item, Partial):  # folded where it was trained: the same layout as the global params
                for report in item.reports:
                    self._hear(heard, report.client_id, report.weight, report.stats, download, download)
                aggregator.merge(item.aggregator)
            else:
                self._hear(heard, item.client_id, item.weight, item.stats, download, item.params.nbytes)
                aggregator.add(item)
        # a planned round may lose every client (offline, too late); an unplanned one without updates is an error
        aggregate = aggregator.finish() if heard or plan.outcome is None else None
        # known from the plan, or (no data sizes: a deployed runtime) as long as the slowest update
        round_s = plan.outcome.duration if plan.outcome is not None else max((h[2] for h in heard.values()), default=0)
        duration = plan.start - self.clock.now + round_s  # plus any wait for the first client to check in
        duration += aggregate.overhead_s if aggregate is not None else 0.0  # e.g. secure aggregation's exchanges
        metrics = train_metrics(aggregate)
        metrics.update(clients=float(aggregate.count if aggregate is not None else 0), sim_round_s=duration)
        if aggregate is not None and aggregate.overhead_s:
            metrics["sim_aggregation_s"] = aggregate.overhead_s
        metrics.update(self.planner.metrics(plan, plan.start - self.clock.now))
        metrics.update(self.runtime.round_metrics())
        if aggregate is not None:
            metrics.update(self.pipeline.round_metrics())  # e.g. privacy's epsilon after this round
        with deferred_interrupt():  # the commit: a Ctrl-C here waits, so no round is ever half-applied
            return self.commit(rnd, aggregate, metrics, wall, duration, self.planner.feedback(plan, heard, round_s))

    def _context(self, rnd: int, plan: RoundPlan) -> AggregationContext:
        """The round as an aggregator that talks to its parties sees it: who was asked, their links, and who is
        gone by the time the training is over (secure aggregation's unmask request)."""
        clock = self.clock
        trained_s = plan.outcome.duration if plan.outcome is not None else 0.0

        def offline_at_unmask(delivered: Collection[int | str]) -> list[int | str]:
            ids = [c for c in delivered if isinstance(c, (int, np.integer))]
            if not ids:
                return []
            left = clock.time_online(np.asarray(ids, dtype=np.int64), at=plan.start)
            return [c for c, s in zip(ids, left, strict=True) if s <= trained_s]

        return AggregationContext(
            rnd,
            self.config.seed,
            tuple(int(c) for c in plan.selected),
            latency=lambda c, down, up: clock.client_latency(c, 0.0, down, up),
            offline_at_unmask=offline_at_unmask,
        )

    def _hear(self, heard: Heard, client: int | str, weight: float, stats: TrainStats, down: int, up: int) -> None:
        """What the clock and the selector learn of one update: its loss, samples and device latency."""
        samples = stats.samples if stats.samples is not None else weight
        heard[client] = (reported_loss(stats), float(samples), self.clock.client_latency(client, samples, down, up))

    def commit(
        self,
        rnd: int,
        aggregate: Aggregate | None,
        metrics: dict[str, float],
        wall: float,
        advance: float = 0.0,
        feedback: RoundFeedback | None = None,
    ) -> RoundRecord:
        """Apply ``aggregate`` (None: nothing arrived), move the clock ``advance`` seconds, evaluate, tell the
        selector, and record ``rnd`` as committed. Call it inside ``deferred_interrupt``; ``wall`` is when the
        round's work began (``time.perf_counter``)."""
        if aggregate is not None:
            self.strategy.server_step(self.global_params, aggregate, self.strategy_state)
            if not self.global_params.isfinite():
                raise FloatingPointError(f"{self.unit} {rnd}: the global params became NaN/inf after the server step")
        metrics["sim_time_s"] = self.clock.advance(advance)
        last = rnd == self.config.rounds - 1
        if self.config.eval_every and ((rnd + 1) % self.config.eval_every == 0 or last):
            metrics.update({f"test_{k}": v for k, v in self.runtime.evaluate(self.global_params).items()})
        if feedback is not None:
            self.planner.observe(rnd, feedback)
        metrics["wall_s"] = time.perf_counter() - wall
        self.wall_time += metrics["wall_s"]
        metrics["wall_time_s"] = self.wall_time
        self._note_target(rnd, metrics)
        if not getattr(self.runtime, "virtual_clock", True):  # real parties: a simulated clock would mislead
            for key in VIRTUAL_CLOCK_METRICS:
                metrics.pop(key, None)
        record = RoundRecord(rnd, metrics)
        self.round = rnd + 1
        self.history.append(record)
        return record

    @property
    def strategy_state(self) -> dict[str, FlatParams]:
        """What the strategy's server step sees (``state`` may hold more that checkpoints must carry)."""
        return self.state

    def _note_target(self, rnd: int, metrics: dict[str, float]) -> None:
        cfg = self.config
        value = metrics.get(cfg.target_metric)
        if cfg.target is None or self.time_to_target is not None or value is None:
            return
        if _REACHED[cfg.target_mode](value, cfg.target):
            metrics["sim_time_to_target_s"] = metrics["sim_time_s"]
            metrics["wall_time_to_target_s"] = metrics["wall_time_s"]
            self.time_to_target = {
                "round": float(rnd),
                "sim_time_s": metrics["sim_time_s"],
                "wall_time_s": metrics["wall_time_s"],
            }


# what the virtual clock adds to a round's record; runtimes of real parties (``virtual_clock = False``) drop them
VIRTUAL_CLOCK_METRICS = ("sim_round_s", "sim_time_s", "sim_time_to_target_s", "sim_aggregation_s")


def train_metrics(aggregate: Aggregate | None) -> dict[str, float]:
    """The clients' reported metrics, averaged by the aggregator, under a ``train_`` prefix."""
    if aggregate is None:
        return {}
    return {f"train_{k}" if not k.startswith("train_") else k: v for k, v in aggregate.metrics.items()}
