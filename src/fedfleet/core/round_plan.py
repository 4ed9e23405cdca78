"""Who trains a round, decided before anyone trains: the synchronous loop's planner.

With system traces (simulation) a round is planned before training: each selected client's latency follows
from its data size and the update's size, its availability from the trace, and the round-end policy
(``core.round_end``) decides whose updates will count; only those clients are trained, so a dropped client
costs no wall time. Without ``client_sizes`` (a deployed runtime) every selected party trains and the
latencies are computed from the updates that arrive.

The planner also owns the conversation with the selector: the choice among the checked-in clients and the
feedback after each committed round. The asynchronous loop (``core.async_loop``) selects through it too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.core.clock import VirtualClock, planned_samples
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.round_end import RoundEnd, RoundFeedback, RoundOutcome, WaitForAll
from fedfleet.core.seeding import SELECT
from fedfleet.core.update import TrainStats

Heard = dict[int | str, tuple[float, float, float]]  # client -> (reported loss, samples, latency s)


@dataclass
class RoundPlan:
    """Who trains this round, decided before training (``outcome``) or, without data sizes, after it."""

    selected: np.ndarray  # int64: the clients asked to train
    train: np.ndarray  # int64: the clients the runtime trains (their updates will be folded)
    start: float  # virtual time the round starts (later than now if the server waited for a check-in)
    outcome: RoundOutcome | None = None  # None: latencies are measured from the updates that arrive
    online: int | None = None  # clients checked in at the start (None: no availability trace)


class RoundPlanner:
    """Selects each round's cohort among the checked-in clients and, with data sizes, decides whose updates count.

    ``client_sizes`` (examples per client) lets rounds be planned before training; ``round_end`` (default:
    wait for all) then decides whose updates count.
    """

    def __init__(
        self,
        selector: Any,
        clock: VirtualClock,
        population: int,
        cohort: int,
        seed: int,
        round_end: RoundEnd | None = None,
        client_sizes: np.ndarray | None = None,
    ) -> None:
        if round_end is not None and client_sizes is None:
            raise ValueError("a round-end policy needs client_sizes (examples per client) to plan each round")
        if client_sizes is not None and len(client_sizes) != population:
            raise ValueError(f"client_sizes has {len(client_sizes)} entries for {population} clients")
        self.selector = selector
        self.clock = clock
        self.population = population
        self.cohort = cohort
        self.seed = seed
        self.client_sizes = None if client_sizes is None else np.asarray(client_sizes, dtype=np.int64)
        self.round_end = round_end or (WaitForAll() if client_sizes is not None else None)
        self._sees_available = "available" in inspect.signature(selector.select).parameters
        self._observe = getattr(selector, "observe", None)
        # a selector that asks for the clients' profiles (Oort with profiles=True) gets them before round 1
        self._register = getattr(selector, "register", None) if getattr(selector, "profiles", False) else None

    def plan(self, rnd: int, config: FitConfig, nbytes: int) -> RoundPlan:
        """Who checked in, whom to select, and (with client sizes) whose updates will count and when the round
        ends. ``nbytes``: the size of the exchanged params (download and upload: the update is a delta)."""
        start = self.clock.now
        online = self.clock.online_clients(start)
        if online is not None and len(online) == 0:  # nobody is connected: wait for the first to check in
            start = self.clock.next_check_in(start)
            online = self.clock.online_clients(start)
        if self._register is not None:
            self.register_profiles(config, nbytes)
        want = self.round_end.cohort_size(self.cohort) if self.round_end is not None else self.cohort
        n = min(want, self.population if online is None else len(online))
        clients = np.asarray(self.select(n, rnd, online), dtype=np.int64)
        if self.client_sizes is None or self.round_end is None:
            return RoundPlan(clients, clients, start)
        samples = planned_samples(self.client_sizes[clients], config)
        latency = self.clock.latencies(clients, samples, nbytes, nbytes)
        k = min(self.cohort, n)
        outcome = self.round_end.decide(k, latency, self.clock.time_online(clients, start))
        return RoundPlan(clients, clients[outcome.keep], start, outcome, None if online is None else len(online))

    def register_profiles(self, config: FitConfig, nbytes: int) -> None:
        """Tell the selector what each client reports when it checks in: its examples and its device's expected
        seconds for a round (from the capacity trace, without availability). Once, before the first round."""
        register, self._register = self._register, None
        if register is None or self.client_sizes is None:
            return  # a deployed runtime: the parties' sizes are unknown before they train
        every = np.arange(self.population)
        samples = planned_samples(self.client_sizes, config)
        durations = self.clock.latencies(every, samples, nbytes, nbytes) if self.clock.traces is not None else None
        register(durations=durations, sizes=self.client_sizes)

    def select(self, n: int, rnd: int, available: np.ndarray | None, seed: int | None = None) -> np.ndarray:
        """``n`` clients among ``available`` (None: the whole population); ``seed`` defaults to the job's
        selection stream, the one every synchronous round uses."""
        seed = self.seed + SELECT if seed is None else seed
        if available is None:
            return self.selector.select(self.population, n, rnd, seed)
        if self._sees_available:
            return self.selector.select(self.population, n, rnd, seed, available=available)
        # a selector that knows nothing of availability chooses among the checked-in clients by position
        return np.sort(available[np.asarray(self.selector.select(len(available), n, rnd, seed), dtype=np.int64)])

    def observe(self, rnd: int, feedback: RoundFeedback) -> None:
        """Tell the selector what the server saw of the clients it chose (if it learns from that)."""
        if self._observe is not None:
            self._observe(rnd, feedback)

    @staticmethod
    def metrics(plan: RoundPlan, waited: float) -> dict[str, float]:
        if plan.outcome is None:
            return {}
        out = {
            "sim_wait_s": waited,  # nobody was online at the round's start: the server waited for a check-in
            "selected": float(len(plan.selected)),
            "dropped_offline": float(plan.outcome.offline.sum()),
            "dropped_late": float(plan.outcome.late.sum()),
        }
        if plan.online is not None:
            out["online"] = float(plan.online)
        return out

    @staticmethod
    def feedback(plan: RoundPlan, heard: Heard, duration: float) -> RoundFeedback:
        """What the server saw of each selected client: the reports of those that delivered, and for the rest
        how long it waited for them (``duration``, the round's length from its start)."""
        clients = plan.selected
        got = [heard.get(int(c)) for c in clients]
        completed = np.array([g is not None for g in got], dtype=bool)
        loss = np.array([g[0] if g is not None else np.nan for g in got], dtype=np.float64)
        samples = np.array([g[1] if g is not None else 0.0 for g in got], dtype=np.float64)
        waited = np.full(len(clients), duration)
        if plan.outcome is not None:  # a client that disconnected tells nothing about its speed
            waited[plan.outcome.offline] = np.nan
        took = np.array([g[2] if g is not None else np.nan for g in got], dtype=np.float64)
        return RoundFeedback(clients, completed, loss, samples, np.where(completed, took, waited))


def reported_loss(stats: TrainStats) -> float:
    """Oort's loss term sqrt(mean loss^2) when the trainer reports it, else the mean training loss (NaN: none)."""
    if stats.loss_sq is not None:
        return float(np.sqrt(stats.loss_sq))
    return float(stats.loss) if stats.loss is not None else float("nan")
