"""The one round loop. Every runtime (in-process simulation, Ray, gRPC) is driven by it.

    select -> configure -> execute on the runtime -> aggregate (streaming) -> server step -> evaluate
    -> callbacks

The loop owns the server state (global params, strategy state, round, virtual clock) and nothing else:
the maths is the strategy's, the transport is the runtime's, side effects are callbacks'.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedfleet.core.aggregate import Aggregator
from fedfleet.core.clock import VirtualClock
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.seeding import SELECT
from fedfleet.core.signals import deferred_interrupt
from fedfleet.core.update import Aggregate, Update

log = logging.getLogger(__name__)


class RoundIncomplete(RuntimeError):
    """The runtime could not collect enough updates for a round; the loop runs the round again."""


class StrategyLike(Protocol):
    def configure_fit(self, config: FitConfig) -> FitConfig: ...
    def init_state(self, global_params: FlatParams) -> dict[str, FlatParams]: ...
    def aggregator(self, global_params: FlatParams) -> Aggregator: ...
    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: dict[str, FlatParams]) -> None: ...


class SelectorLike(Protocol):
    def select(self, population: int, k: int, round: int, seed: int) -> np.ndarray: ...


class Runtime(Protocol):
    """Executes a round's training on the selected parties and yields their updates as they arrive."""

    @property
    def population(self) -> int: ...

    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]: ...

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


class RoundLoop:
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
    ) -> None:
        if config.cohort > runtime.population:
            raise ValueError(f"cohort {config.cohort} is larger than the population of {runtime.population}")
        self.strategy = strategy
        self.runtime = runtime
        self.selector = selector
        self.global_params = global_params
        self.fit_config = fit_config
        self.config = config
        self.callbacks = list(callbacks)
        self.clock = clock or VirtualClock()
        self.state = strategy.init_state(global_params)
        self.round = 0  # the next round to run; rounds [0, self.round) are committed
        self.history: list[RoundRecord] = []
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
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self.global_params.copy_(snap["global"])
        for key, value in snap["state"].items():
            self.state[key].copy_(value)
        self.round = int(snap["round"])
        self.clock.now = float(snap["sim_time"])
        self.history = [RoundRecord(**r) for r in snap.get("history", [])]

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
                    raise
                log.warning(
                    "%s; running round %d again (attempt %d of %d)", exc, rnd + 1, attempt + 1, self.config.max_attempts
                )
        raise AssertionError("unreachable")

    def run_round(self, rnd: int) -> RoundRecord:
        """Train, fold and commit round ``rnd``; afterwards ``self.round == rnd + 1``."""
        wall = time.perf_counter()
        clients = self.selector.select(self.runtime.population, self.config.cohort, rnd, self.config.seed + SELECT)
        config = self.strategy.configure_fit(dataclasses.replace(self.fit_config, round=rnd, seed=self.config.seed))
        aggregator = self.strategy.aggregator(self.global_params)
        download = self.global_params.nbytes
        slowest = 0.0
        for update in self.runtime.fit(self.global_params, clients, config):
            samples = update.metrics.get("samples", update.weight)
            latency = self.clock.client_latency(update.client_id, samples, download, update.params.nbytes)
            slowest = max(slowest, latency)
            aggregator.add(update)
        aggregate = aggregator.finish()
        metrics = {f"train_{k}" if not k.startswith("train_") else k: v for k, v in aggregate.metrics.items()}
        metrics.update(clients=float(aggregate.count), sim_round_s=slowest)
        metrics.update(self.runtime.round_metrics())
        with deferred_interrupt():  # the commit: a Ctrl-C here waits, so no round is ever half-applied
            self.strategy.server_step(self.global_params, aggregate, self.state)
            if not self.global_params.isfinite():
                raise FloatingPointError(f"round {rnd}: the global params became NaN/inf after the server step")
            metrics["sim_time_s"] = self.clock.advance(slowest)
            last = rnd == self.config.rounds - 1
            if self.config.eval_every and ((rnd + 1) % self.config.eval_every == 0 or last):
                metrics.update({f"test_{k}": v for k, v in self.runtime.evaluate(self.global_params).items()})
            metrics["wall_s"] = time.perf_counter() - wall
            record = RoundRecord(rnd, metrics)
            self.round = rnd + 1
            self.history.append(record)
        return record
