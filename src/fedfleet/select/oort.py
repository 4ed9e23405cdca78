"""Oort (Lai et al., OSDI'21): prefer clients whose data is useful now and whose devices are fast.

The utility of a client that has taken part is

    statistical  |B_i| * sqrt(mean loss^2)    (samples trained x the loss it reported), clipped and normalised
    + staleness  sqrt(0.1 * ln(R) / r_i)     (R: this round, r_i: the round it last took part; 1-based)
    x system     (T / t_i) ** alpha          only when its reported duration t_i exceeds the preferred T

``T`` is a percentile of the durations known so far; a pacer raises that percentile when the
exploited utility stops growing (so slower clients with useful data get in) and lowers it when utility
swings wildly. Each round a share epsilon (decaying from 0.9 to 0.3) of the cohort explores clients that
never took part; the rest exploits: the clients whose utility reaches 95% of the k-th best form a pool,
sampled in proportion to utility. Clients that took part more than ``blacklist_rounds`` times are left out
(at most ``blacklist_max_fraction`` of the population).

Exploration: a client that checks in can tell the server its data size and its device's expected round
duration (hardware and network profile), as FedScale's clients do when they register; ``register`` takes
them. Oort then explores as in its reference implementation: each unexplored client scores
``size x (T / duration) ** alpha``, and the cohort's explorers are drawn in proportion to that score from
the ``sample_window x n`` best. Why it matters: while most of the cohort explores (the first few dozen
rounds), exploring blindly makes rounds as slow as uniform selection's; measured in
``benchmarks/oort_vs_uniform.py``. Without ``register`` the server knows nothing of unexplored clients and
explores uniformly. With ``profiles=True`` a simulation registers every client before its first round, from
the device traces and data sizes (what each client's device would report).

Everything else the selector knows comes from ``observe`` (what clients reported back); the state is a few
arrays over the population and every step is vectorised, so 1,000,000 clients cost ~30 MB and a
selection takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedfleet.core.checkpoint import CheckpointMismatchError
from fedfleet.core.round_end import RoundFeedback
from fedfleet.core.seeding import generator
from fedfleet.select.base import SELECTORS, check_k


@SELECTORS.register("oort")
@dataclass
class OortSelector:
    exploration: float = 0.9  # initial share of the cohort spent on clients that never took part
    exploration_decay: float = 0.98  # per round
    exploration_min: float = 0.3
    preferred_percentile: float = 30.0  # T = this percentile of the reported durations (the pacer moves it)
    penalty: float = 2.0  # alpha
    pacer_step: int = 20  # rounds per pacer window
    pacer_delta: float = 5.0  # percentile points the pacer moves T by
    blacklist_rounds: int | None = None  # leave out clients that took part more than this many times
    blacklist_max_fraction: float = 0.3
    clip_quantile: float = 0.95  # statistical utilities above this quantile are clipped (outliers)
    cutoff: float = 0.95  # the exploitation pool: utility >= cutoff x the k-th best utility
    staleness_weight: float = 0.1
    sample_window: float = 5.0  # explorers are drawn from the sample_window x n best-scored unexplored clients
    # clients tell their data size and expected round time when they check in (FedScale's registration); the
    # simulation's planner then calls ``register`` before the first round
    profiles: bool = False

    _reward: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    _duration: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    _inv_sqrt_last: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))  # 1/sqrt(r_i)
    _count: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0, np.int64))
    _size: np.ndarray | None = field(init=False, repr=False, default=None)  # registered data sizes
    _registered: bool = field(init=False, repr=False, default=False)  # register() told durations or sizes
    _exploited: dict[int, np.ndarray] = field(init=False, repr=False, default_factory=dict)
    _exploit_util: dict[int, float] = field(init=False, repr=False, default_factory=dict)  # 1-based round
    _paced_until: int = field(init=False, repr=False, default=0)
    _reported: int = field(init=False, repr=False, default=0)  # clients with a known duration

    def __post_init__(self) -> None:
        for name in ("exploration", "exploration_min", "clip_quantile", "cutoff", "blacklist_max_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.preferred_percentile <= 100.0:
            raise ValueError(f"preferred_percentile must be in (0, 100], got {self.preferred_percentile}")
        if self.pacer_step < 1 or self.penalty < 0 or self.pacer_delta < 0 or self.staleness_weight < 0:
            raise ValueError("pacer_step must be >= 1; penalty, pacer_delta and staleness_weight >= 0")
        if self.blacklist_rounds is not None and self.blacklist_rounds < 0:
            raise ValueError(f"blacklist_rounds must be >= 0, got {self.blacklist_rounds}")
        if not self.sample_window >= 1.0:
            raise ValueError(f"sample_window must be >= 1, got {self.sample_window}")

    # -- what clients tell the server when they check in -------------------------------------------
    def register(self, durations: np.ndarray | None = None, sizes: np.ndarray | None = None) -> None:
        """Each client's expected seconds for a round (``durations``, from its device profile) and examples
        (``sizes``), indexed by client id; call it before the first ``select``. Reported durations replace
        the expected ones as rounds go by."""
        given = [np.asarray(a, dtype=np.float64) for a in (durations, sizes) if a is not None]
        if not given:
            return
        n = len(given[0])
        if any(a.shape != (n,) for a in given):
            raise ValueError(
                f"register: durations and sizes must be 1-D arrays of one length, got {[a.shape for a in given]}"
            )
        d = None if durations is None else given[0]
        size = None if sizes is None else given[-1]
        if d is not None and not (np.isfinite(d) & (d > 0)).all():
            raise ValueError("register: every expected duration must be a finite number of seconds > 0")
        if size is not None and not (np.isfinite(size) & (size >= 0)).all():
            raise ValueError("register: every data size must be a finite number >= 0")
        self._ensure(n)  # only after the checks: a refused call leaves the selector as it was
        if d is not None:
            unknown = np.isnan(self._duration)
            self._duration[unknown] = d[unknown]
            self._reported = int((~np.isnan(self._duration)).sum())
        if size is not None:
            self._size = size.copy()
        self._registered = True

    # -- the selection ---------------------------------------------------------------------------
    def select(self, population: int, k: int, round: int, seed: int, available: np.ndarray | None = None) -> np.ndarray:
        check_k(k, population, available)
        self._ensure(population)
        r = round + 1
        self._pace(r)
        rng = generator(seed, round)
        candidates = np.arange(population) if available is None else np.asarray(available, dtype=np.int64)
        candidates = self._drop_blacklisted(candidates, k)
        seen = ~np.isnan(self._reward[candidates])
        explored, unexplored = candidates[seen], candidates[~seen]
        epsilon = max(self.exploration * self.exploration_decay**round, self.exploration_min)
        n_explore = min(k - min(int(k * (1.0 - epsilon)), len(explored)), len(unexplored))
        n_exploit = k - n_explore  # <= len(explored): there are at least k candidates
        exploit = self._exploit(explored, n_exploit, r, rng)
        explore = self._explore(unexplored, n_explore, rng)
        self._exploited[round] = exploit
        return np.sort(np.concatenate((exploit, explore)))

    def utility(self, clients: np.ndarray, round: int) -> np.ndarray:
        """Oort's utility of explored ``clients`` at (0-based) ``round``, relative to each other."""
        r = round + 1
        reward = self._reward[clients]
        cut = min(int(len(reward) * self.clip_quantile), len(reward) - 1)
        clip = np.partition(reward, cut)[cut]
        low = reward.min() * 0.999
        span = max(float(reward.max() - low), 1e-4)
        # in place throughout: a million clients means every temporary array costs ~1 ms
        util = np.minimum(reward, clip, out=reward)
        util -= low
        util /= span
        stale = self._inv_sqrt_last[clients]  # sqrt(w ln R / r_i) = sqrt(w ln R) x (1 / sqrt(r_i))
        stale *= np.sqrt(self.staleness_weight * np.log(r))
        util += stale
        # system utility: (T / t)^alpha where t > T; fmin ignores NaN (never reported: no penalty)
        factor = np.divide(self.preferred_duration(), self._duration[clients])
        np.fmin(factor, 1.0, out=factor)
        util *= factor**self.penalty
        return np.abs(util, out=util)

    def preferred_duration(self) -> float:
        """T: the current percentile of every duration reported so far (inf before any, or at 100%)."""
        known = self._duration if self._reported == len(self._duration) else self._duration[~np.isnan(self._duration)]
        if len(known) == 0 or self.preferred_percentile >= 100.0:
            return float("inf")
        at = min(int(len(known) * self.preferred_percentile / 100.0), len(known) - 1)
        return float(np.partition(known, at)[at])

    def _exploit(self, explored: np.ndarray, n: int, r: int, rng: np.random.Generator) -> np.ndarray:
        if n == 0:
            return np.empty(0, dtype=np.int64)
        util = self.utility(explored, r - 1)
        kth = np.partition(util, len(util) - n)[len(util) - n]
        pool = np.flatnonzero(util >= self.cutoff * kth)
        return explored[pool[_weighted_sample(util[pool], n, rng)]]

    def _explore(self, unexplored: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        if not self._registered:  # nothing is known about clients that never took part: uniformly
            return unexplored[rng.choice(len(unexplored), size=n, replace=False, shuffle=False)]
        if n == 0:
            return np.empty(0, dtype=np.int64)
        score = np.ones(len(unexplored)) if self._size is None else self._size[unexplored] + 1e-12
        factor = np.fmin(np.divide(self.preferred_duration(), self._duration[unexplored]), 1.0)  # NaN: no penalty
        score *= factor**self.penalty
        window = min(len(unexplored), max(n, int(self.sample_window * n)))
        best = np.argpartition(-score, window - 1)[:window]
        return unexplored[best[_weighted_sample(score[best], n, rng)]]

    def _drop_blacklisted(self, candidates: np.ndarray, k: int) -> np.ndarray:
        if self.blacklist_rounds is None:
            return candidates
        over = np.flatnonzero(self._count > self.blacklist_rounds)
        if len(over) == 0:
            return candidates
        cap = int(self.blacklist_max_fraction * len(self._count))
        if len(over) > cap:  # never blacklist more than the cap: keep out the most used ones only
            over = over[np.argsort(-self._count[over], kind="stable")[:cap]]
        banned = np.zeros(len(self._count), dtype=bool)
        banned[over] = True
        allowed = candidates[~banned[candidates]]
        return allowed if len(allowed) >= k else candidates  # too few left: better a repeat than no round

    def _pace(self, r: int) -> None:
        """Move T's percentile once per pacer window, from the exploited utility of the last two windows."""
        step = self.pacer_step
        if r <= self._paced_until or r < 2 * step or r % step:
            return
        self._paced_until = r
        before = sum(self._exploit_util.get(i, 0.0) for i in range(r - 2 * step, r - step))
        recent = sum(self._exploit_util.get(i, 0.0) for i in range(r - step, r))
        if before <= 0:  # nothing was exploited in the earlier window (still exploring): no trend yet
            return
        change = abs(recent - before)
        if change <= 0.1 * before:  # utility stagnates: relax T so slower, useful clients get in
            self.preferred_percentile = min(100.0, self.preferred_percentile + self.pacer_delta)
        elif change >= 5 * before:  # utility swings: tighten T again
            self.preferred_percentile = max(self.pacer_delta, self.preferred_percentile - self.pacer_delta)

    # -- what the server learns after each round ---------------------------------------------------
    def observe(self, round: int, feedback: RoundFeedback) -> None:
        if not len(self._reward):  # nothing selected yet: nothing to learn about
            return
        c = np.asarray(feedback.clients, dtype=np.int64)
        ok = feedback.completed & np.isfinite(feedback.loss)
        reward = feedback.samples * np.abs(feedback.loss)
        self._reward[c[ok]] = reward[ok]
        if ok.any():  # FedScale: a client that delivered nothing gets the round's mean utility ...
            fill = c[~ok][np.isnan(self._reward[c[~ok]])]
            self._reward[fill] = reward[ok].mean()  # ... so its (long) duration penalises it from now on
        told = np.isfinite(feedback.duration)
        self._reported += int(np.isnan(self._duration[c[told]]).sum())
        self._duration[c[told]] = feedback.duration[told]
        self._inv_sqrt_last[c] = 1.0 / np.sqrt(round + 1)
        self._count[c] += 1
        exploited = self._exploited.pop(round, np.empty(0, dtype=np.int64))
        delivered = c[ok][np.isin(c[ok], exploited)]
        self._exploit_util[round + 1] = float(self._reward[delivered].sum())

    # -- checkpoints ---------------------------------------------------------------------------------
    _ARRAYS: ClassVar[tuple[str, ...]] = ("_reward", "_duration", "_inv_sqrt_last", "_count")
    _SCALARS: ClassVar[tuple[str, ...]] = ("_registered", "_paced_until", "_reported", "preferred_percentile")

    def state_dict(self) -> dict[str, Any]:
        """Everything Oort learned (per-client arrays, the pacer's position), for a checkpoint."""
        state: dict[str, Any] = {"kind": "oort", **{name: getattr(self, name) for name in self._SCALARS}}
        state.update({name: getattr(self, name) for name in self._ARRAYS})
        if self._size is not None:
            state["_size"] = self._size
        state["exploit_util"] = {str(r): u for r, u in self._exploit_util.items()}
        state.update({f"exploited/{r}": picks for r, picks in self._exploited.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "oort":
            raise CheckpointMismatchError(
                f"the checkpoint holds the state of selector {state.get('kind', 'unknown')!r}, not oort's; resume "
                f"with the selector the run started with, or start a new run (--overwrite)"
            )
        if len(self._reward) and len(self._reward) != len(state["_reward"]):
            raise CheckpointMismatchError(
                f"the checkpoint's Oort state covers {len(state['_reward'])} clients, this job {len(self._reward)}"
            )
        for name in self._ARRAYS:
            setattr(self, name, np.array(state[name].numpy()))
        self._size = np.array(state["_size"].numpy()) if "_size" in state else None
        self._registered, self._paced_until = bool(state["_registered"]), int(state["_paced_until"])
        self._reported, self.preferred_percentile = int(state["_reported"]), float(state["preferred_percentile"])
        self._exploit_util = {int(r): float(u) for r, u in state["exploit_util"].items()}
        prefix = "exploited/"
        self._exploited = {int(k[len(prefix) :]): np.array(v.numpy()) for k, v in state.items() if k.startswith(prefix)}

    def _ensure(self, population: int) -> None:
        if len(self._reward) == population:
            return
        if len(self._reward):
            raise ValueError(f"the Oort selector saw {len(self._reward)} clients before, now {population}")
        self._reward = np.full(population, np.nan)
        self._duration = np.full(population, np.nan)
        self._inv_sqrt_last = np.ones(population)
        self._count = np.zeros(population, dtype=np.int64)


def _weighted_sample(weight: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions drawn without replacement in proportion to ``weight``, in one pass (Efraimidis-Spirakis:
    the n largest log(u) / w), so a pool of a million costs one vectorised pass."""
    keys = np.log(rng.random(len(weight))) / np.maximum(weight, 1e-12)
    return np.argpartition(-keys, n - 1)[:n]
