"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous buffered aggregation on the virtual clock.

    keep `concurrency` clients training -> each arrival joins the buffer, scaled by its staleness
    -> every `buffer` arrivals: the strategy's server step on the buffer's mean -> version + 1

A client dispatched at virtual time t trains from the global model of that moment (version v) and is heard
of at t + latency (download + compute + upload, from the traces), or loses its update if it goes offline
first. Its staleness at arrival is the number of server steps committed since v. Freed slots are refilled
from the selector, among the clients online now and not already training, once all events of an instant
are handled (so a client dispatched at the instant of a server step starts from the new model).

One record (``RoundRecord``) per server step, so callbacks, metrics files, checkpoints, early stopping and
time-to-target work as for rounds; ``rounds`` counts server steps. The strategy's server step applies the
buffer's mean, so FedBuff composes with FedAvg's ``server_lr``, FedAvgM and the FedOpt family; strategies
with their own aggregator (q-FedAvg) are refused, since they would ignore the staleness weights.

Clients are trained eagerly at dispatch and only those that will deliver: a client known to go offline
first costs no wall time. A checkpoint carries the clients in flight (their held deltas and a table), so a
resumed run continues exactly; it is ``concurrency`` model-sized deltas larger than a synchronous one.
Ctrl-C finishes the current server step first (a second Ctrl-C stops at once), because a step's clients
are already partly resolved; a run stopped inside a step (an error, a second Ctrl-C) checkpoints its last
committed step with no clients in flight, and a resumed run dispatches afresh from there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedfleet.core.async_buffer import StalenessBuffer
from fedfleet.core.async_flights import Flight, InFlight
from fedfleet.core.async_staleness import Polynomial, StalenessFn, arrival_factor
from fedfleet.core.clock import VirtualClock, planned_samples
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import (
    Callback,
    LoopConfig,
    RoundLoop,
    RoundRecord,
    Runtime,
    SelectorLike,
    StrategyLike,
    train_metrics,
)
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import Pipeline
from fedfleet.core.round_end import RoundFeedback
from fedfleet.core.round_plan import reported_loss
from fedfleet.core.seeding import SELECT, derive_seed
from fedfleet.core.signals import deferred_interrupt
from fedfleet.core.update import Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedBuff:
    """FedBuff's hyperparameters. ``buffer`` arrivals make a server step; ``concurrency`` clients train at
    once; ``staleness`` scales each arrival (default 1 / sqrt(1 + s)), times its examples when
    ``weight_by_examples``; arrivals more than ``max_staleness`` steps old are discarded (None: none are)."""

    buffer: int = 10
    concurrency: int = 10
    staleness: StalenessFn = field(default_factory=Polynomial)
    weight_by_examples: bool = True
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ValueError(f"buffer must be >= 1 (arrivals per server step), got {self.buffer}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (clients training at once), got {self.concurrency}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 server steps, got {self.max_staleness}")


class NoProgress(RuntimeError):
    """Clients keep going offline before they finish: no server step can ever fill its buffer."""


@dataclass
class _Step:
    """What happened between two server steps (one record)."""

    start: float  # virtual time the step's collection began
    dispatched: int = 0
    dropped: int = 0  # went offline before finishing
    discarded: int = 0  # arrived more than max_staleness steps late
    staleness: list[int] = field(default_factory=list)  # of the folded arrivals
    seen: list[tuple[int, bool, float, float, float]] = field(default_factory=list)  # feedback rows

    def feedback(self) -> RoundFeedback:
        """Per resolved client: (client, completed, loss, samples, duration); NaN duration if it left."""
        c, ok, loss, samples, took = (list(col) for col in zip(*self.seen, strict=True)) if self.seen else ([],) * 5
        return RoundFeedback(
            np.asarray(c, dtype=np.int64), np.asarray(ok, dtype=bool), np.asarray(loss, dtype=np.float64),
            np.asarray(samples, dtype=np.float64), np.asarray(took, dtype=np.float64),
        )  # fmt: skip


class AsyncLoop(RoundLoop):
    """The round loop's surface (run, callbacks, snapshot/restore, time-to-target) over FedBuff's server steps."""

    unit: ClassVar[str] = "server step"

    def __init__(
        self,
        strategy: StrategyLike,
        runtime: Runtime,
        selector: SelectorLike,
        global_params: FlatParams,
        fit_config: FitConfig,
        config: LoopConfig,
        fedbuff: FedBuff,
        client_sizes: np.ndarray,
        callbacks: Sequence[Callback] = (),
        clock: VirtualClock | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        """``client_sizes`` (examples per client) give each dispatched client's latency before it trains;
        ``pipeline``'s fold transforms see each arrival before it joins the buffer, and the buffer's mean."""
        if fedbuff.concurrency > runtime.population:
            raise ValueError(
                f"FedBuff concurrency {fedbuff.concurrency} is larger than the population of {runtime.population}"
            )
        if pipeline is not None and pipeline.secure is not None:
            raise ValueError(
                "secure aggregation sums a round's masked inputs at once; FedBuff folds arrivals one by one, so the "
                "two do not combine: use synchronous rounds (no fedbuff:) with secure_aggregation"
            )
        if not getattr(strategy.aggregator(global_params), "weighted_mean", False):
            raise ValueError(
                f"FedBuff folds arrivals with its own staleness-weighted mean, but strategy "
                f"{type(strategy).__name__} aggregates its own way and would ignore the staleness; use fedavg, "
                f"fedavgm, fedprox, fedadam, fedyogi or fedadagrad"
            )
        super().__init__(
            strategy, runtime, selector, global_params, fit_config, config, callbacks, clock, None, client_sizes,
            pipeline,
        )  # fmt: skip
        self.fedbuff = fedbuff
        self.client_sizes = self.planner.client_sizes
        self.in_flight = InFlight(global_params, fedbuff.concurrency)
        self._strategy_keys = tuple(self.state)
        self.state.update(self.in_flight.state())  # checkpoints carry the clients in flight
        self._refills = 0  # refills since the last server step (each draws with its own seed)
        self._refilled_at = -math.inf  # the instant of the last refill: at most one per instant
        self._fruitless = 0  # dispatches in a row that delivered nothing
        self._inside_step = False  # events of the next step are being resolved: the live state is not a commit
        self._committed_at = self.clock.now  # virtual time of the last commit

    @property
    def strategy_state(self) -> dict[str, FlatParams]:
        return {k: self.state[k] for k in self._strategy_keys}

    def snapshot(self) -> dict[str, Any]:
        if not self._inside_step:
            self.in_flight.write_table()
            return super().snapshot()
        # stopped inside a step: some held deltas are folded or replaced, so keep only what was committed
        log.warning("stopped inside a server step: the checkpoint holds the last committed step, no clients in flight")
        self.in_flight.write_table(empty=True)
        return {**super().snapshot(), "sim_time": self._committed_at}

    def restore(self, snap: dict[str, Any]) -> None:
        super().restore(snap)
        self.in_flight.read_table()
        self._refills, self._refilled_at = 0, -math.inf
        self._inside_step, self._committed_at = False, self.clock.now

    # -- one server step -----------------------------------------------------------------------------
    def run_round(self, rnd: int) -> RoundRecord:
        """Collect ``buffer`` arrivals, apply their mean, and commit server step ``rnd`` (version rnd + 1)."""
        with _finish_step_on_interrupt():
            record = self._step(rnd)
        return record

    def _step(self, rnd: int) -> RoundRecord:
        wall = time.perf_counter()
        self._inside_step = True
        step = _Step(self.clock.now)
        buffer = StalenessBuffer(self.global_params)
        while len(buffer) < self.fedbuff.buffer:
            if self.in_flight.next_event() <= self.clock.now:
                self._resolve(rnd, step, buffer)
            elif self._refilled_at < self.clock.now:
                self._refill(rnd, step)
            elif len(self.in_flight):
                self.clock.now = self.in_flight.next_event()
            else:
                self.clock.now = self._next_check_in()
        aggregate = self.pipeline.after_fold(buffer.finish())
        metrics = train_metrics(aggregate)
        metrics.update(
            clients=float(aggregate.count),
            sim_round_s=self.clock.now - step.start,
            staleness_mean=float(np.mean(step.staleness)),
            staleness_max=float(max(step.staleness)),
            dispatched=float(step.dispatched),
            dropped_offline=float(step.dropped),
            dropped_stale=float(step.discarded),
            in_flight=float(len(self.in_flight)),
        )
        metrics.update(self.runtime.round_metrics())
        with deferred_interrupt():  # the commit: a Ctrl-C here waits, so no step is ever half-applied
            self._refills, self._inside_step, self._committed_at = 0, False, self.clock.now
            return self.commit(rnd, aggregate, metrics, wall, feedback=step.feedback())

    def _resolve(self, version: int, step: _Step, buffer: StalenessBuffer) -> None:
        """The earliest due event: a disconnection (nothing arrives) or an arrival that joins the buffer."""
        flight, delta = self.in_flight.pop()
        if not flight.delivers:
            step.dropped += 1
            step.seen.append((flight.client, False, math.nan, 0.0, math.nan))  # it tells nothing of its speed
            self._fruitless += 1
            if self._fruitless > max(10_000, 100 * self.fedbuff.concurrency):
                raise NoProgress(
                    f"{self._fruitless} clients in a row went offline before finishing: their latency exceeds "
                    f"their time online; shorten local training (client.epochs / client.steps) or check the traces"
                )
            return
        self._fruitless = 0
        staleness = version - flight.version
        loss = reported_loss(flight.stats)
        if self.fedbuff.max_staleness is not None and staleness > self.fedbuff.max_staleness:
            step.discarded += 1
            step.seen.append((flight.client, False, loss, 0.0, flight.latency))
            return
        scale, weight = arrival_factor(
            self.fedbuff.staleness, staleness, flight.examples, self.fedbuff.weight_by_examples
        )
        arrival = self.pipeline.before_fold(
            Update(delta, flight.examples, flight.metrics, flight.client, True, flight.stats)
        )
        if arrival is None:  # a fold transform left it out
            step.discarded += 1
            step.seen.append((flight.client, False, loss, 0.0, flight.latency))
            return
        buffer.add(arrival.params, scale, weight, {**arrival.metrics, **arrival.stats.as_metrics()})
        step.staleness.append(staleness)
        step.seen.append((flight.client, True, loss, flight.samples, flight.latency))

    def _refill(self, version: int, step: _Step) -> None:
        """Fill free slots with clients online now and not training; train those that will deliver, now,
        from the current global model, and hold their deltas until they arrive."""
        self._refilled_at = now = self.clock.now
        free = self.in_flight.free
        online = self.clock.online_clients(now)
        busy = self.in_flight.clients()
        if online is None:  # no availability trace: everyone is checked in
            available = np.setdiff1d(np.arange(self.runtime.population), busy) if len(busy) else None
            pool = self.runtime.population - len(busy)
        else:
            available = np.setdiff1d(online, busy, assume_unique=True)
            pool = len(available)
        n = min(free, pool)
        if n == 0:
            return
        # the first refill after a step draws exactly as a synchronous round would; later ones draw anew
        k, self._refills = self._refills, self._refills + 1
        seed = self.config.seed if k == 0 else derive_seed(self.config.seed, k)
        self.planner.register_profiles(self.fit_config, self.global_params.nbytes)  # once, if the selector asks
        clients = np.asarray(self.planner.select(n, version, available, seed=seed + SELECT), dtype=np.int64)
        online_for = self.clock.time_online(clients, now)
        staying = online_for > 0  # one checked in at the very end of its session is gone before it starts
        clients, online_for = clients[staying], online_for[staying]
        config = self.strategy.configure_fit(dataclasses.replace(self.fit_config, round=version, seed=seed))
        samples = planned_samples(self.client_sizes[clients], config)
        nbytes = self.global_params.nbytes  # the update is a delta of the exchanged params: the same size
        latency = self.clock.latencies(clients, samples, nbytes, nbytes)
        delivers = latency <= online_for
        slots: dict[int, int] = {}
        for c, lat, stay, ok, s in zip(clients, latency, online_for, delivers, samples, strict=True):
            event = now + (float(lat) if ok else float(stay))
            flight = Flight(int(c), version, now, event, bool(ok), float(lat), float(s), self.in_flight.seq)
            self.in_flight.seq += 1
            slots[int(c)] = self.in_flight.add(flight)
        step.dispatched += len(clients)
        for update in self.runtime.fit(self.global_params, clients[delivers], config):
            slot = slots[int(update.client_id)]
            self.in_flight.slots[slot].copy_(update.params)  # the runtime reuses its buffer for the next client
            flight = self.in_flight.flights[slot]
            flight.examples, flight.metrics, flight.stats = float(update.weight), dict(update.metrics), update.stats

    def _next_check_in(self) -> float:
        """Nobody is training and nobody idle is online: wait for the next client to check in."""
        now = self.clock.now
        t = self.clock.next_check_in(now)
        if t <= now:  # the only clients online leave at this very instant: look just after it
            t = self.clock.next_check_in(now + 1e-6)
        return t


@contextmanager
def _finish_step_on_interrupt() -> Iterator[None]:
    """A first Ctrl-C lets the server step finish (then stops the run); a second stops at once."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set in the main thread
        yield
        return
    pending: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)
        log.warning(
            "Ctrl-C: finishing this server step so the checkpoint keeps the clients in flight; again to stop now"
        )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
