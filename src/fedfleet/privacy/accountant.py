"""The privacy accountant: epsilon at the configured delta after every round, with Google's dp-accounting.

A round is one Gaussian mechanism on the sum of clipped updates (noise multiplier z = noise std / clip),
amplified by how the round's clients were drawn from the population:
- ``poisson``: each client independently with probability q = cohort / population (what the PLD and RDP
  accountants cover under add-or-remove-one neighbouring: the tightest bound, and the default);
- ``fixed``: a uniform sample of exactly ``cohort`` clients (RDP only, under replace-one neighbouring, where
  replacing a client moves the sum by up to 2C, so the mechanism's multiplier is z / 2);
- ``none``: every client every round, no amplification (q = 1: a cross-silo federation, or a simulation whose
  availability traces make the draw non-uniform).

Rounds are kept as runs of identical events (q, z), so the accountant's state is a short list that checkpoints
carry and a resumed run recomposes to the same epsilon. PLD epsilons come from one privacy-loss distribution per
distinct event, self-composed by FFT (a round costs ~0.1-0.3 s at 1,000 rounds on a 2-core CPU; composing
round by round would cost seconds per round).
"""

from __future__ import annotations

import contextlib
import logging
import math
from enum import Enum
from functools import lru_cache
from typing import Any

from fedfleet.errors import ConfigError

# below this a PLD's support explodes (z = 0.01 ran out of 24 GiB; z = 0.3 takes 0.5 GB and 11 s) and epsilon is in
# the hundreds anyway: such a z is accounted with RDP
MIN_PLD_Z = 0.3
LOWEST_Z = {"pld": MIN_PLD_Z, "rdp": 0.05}  # where calibration starts looking


class Sampling(str, Enum):
    POISSON = "poisson"
    FIXED = "fixed"
    NONE = "none"


class AccountantKind(str, Enum):
    PLD = "pld"
    RDP = "rdp"


@contextlib.contextmanager
def _quiet():
    """dp-accounting's RDP logs a warning per order that does not converge at tiny z (harmless, and many)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _event(sampling: Sampling, q: float, z: float, population: int):
    from dp_accounting import dp_event

    if sampling is Sampling.FIXED:
        sample = max(1, round(q * population))
        return dp_event.SampledWithoutReplacementDpEvent(population, sample, dp_event.GaussianDpEvent(z / 2.0))
    gaussian = dp_event.GaussianDpEvent(z)
    return gaussian if q >= 1.0 else dp_event.PoissonSampledDpEvent(q, gaussian)


def _rdp_accountant(sampling: Sampling):
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    relation = NeighboringRelation.REPLACE_ONE if sampling is Sampling.FIXED else NeighboringRelation.ADD_OR_REMOVE_ONE
    return rdp.RdpAccountant(neighboring_relation=relation)


FINE, COARSE = 1e-4, 1e-3  # PLD discretisation of losses: the reported epsilons / calibration's search


@lru_cache(maxsize=64)
def _pld(q: float, z: float, interval: float = FINE):
    """Discretised pessimistically (dp-accounting's default): a coarser grid only ever raises epsilon."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(z, sampling_prob=min(q, 1.0), value_discretization_interval=interval)


class Accountant:
    """Epsilon of the rounds composed so far, at ``delta``."""

    def __init__(self, kind: AccountantKind | str, delta: float, sampling: Sampling | str, population: int) -> None:
        self.kind, self.sampling = AccountantKind(kind), Sampling(sampling)
        if self.kind is AccountantKind.PLD and self.sampling is Sampling.FIXED:
            raise ConfigError(
                "privacy.accountant: pld covers Poisson sampling; with privacy.sampling: fixed use accountant: rdp "
                "(or sampling: poisson, which also gives a smaller epsilon)"
            )
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {delta}")
        self.delta = float(delta)
        self.population = int(population)
        self.runs: list[list[float]] = []  # [q, z, rounds] per run of identical events
        self._epsilon: float | None = 0.0
        self._known: dict[tuple, float] = {}  # (interval, runs) -> epsilon

    @property
    def rounds(self) -> int:
        return int(sum(r[2] for r in self.runs))

    def compose(self, q: float, z: float) -> None:
        """One more round: a Gaussian of multiplier ``z`` on clients sampled at rate ``q``."""
        q = 1.0 if self.sampling is Sampling.NONE else float(q)
        self.check(z)
        if self.runs and self.runs[-1][0] == q and self.runs[-1][1] == z:
            self.runs[-1][2] += 1
        else:
            self.runs.append([q, float(z), 1])
        self._epsilon = None

    def check(self, z: float) -> None:
        if self.kind is AccountantKind.PLD and 0 < z < MIN_PLD_Z:
            raise ConfigError(
                f"noise multiplier {z:.4g} is below {MIN_PLD_Z} (epsilon would be in the hundreds), where the PLD "
                "accountant needs gigabytes: use privacy.accountant: rdp, or more noise"
            )

    def epsilon(self) -> float:
        if self._epsilon is None:
            self._epsilon = self._compute(self.runs)
        return self._epsilon

    def epsilon_after(self, q: float, z: float, rounds: int = 1) -> float:
        """What epsilon would be after ``rounds`` more rounds of (q, z): the budget check before a round."""
        q = 1.0 if self.sampling is Sampling.NONE else float(q)
        self.check(z)
        return self._compute([*self.runs, [q, float(z), rounds]])

    def _compute(self, runs: list[list[float]], interval: float = FINE) -> float:
        """Epsilon of ``runs``, remembered: the budget check before a round asks for exactly what ``epsilon()``
        asks after it (a PLD composition is 0.1-0.15 s, so this halves a DP job's accounting)."""
        key = (interval, *_merged(runs))
        if key not in self._known:
            if len(self._known) > 8:
                self._known.clear()
            self._known[key] = self._compute_fresh(key[1:], interval)
        return self._known[key]

    def _compute_fresh(self, runs: tuple[tuple[float, float, int], ...], interval: float) -> float:
        if not runs:
            return 0.0
        if any(r[1] == 0 for r in runs):
            return math.inf  # a round without noise: no finite guarantee
        if self.kind is AccountantKind.PLD and self.sampling is not Sampling.FIXED and all(r[0] >= 1 for r in runs):
            return gaussian_epsilon(sum(n / z**2 for _, z, n in runs) ** -0.5, self.delta)
        with _quiet():
            if self.kind is AccountantKind.RDP:
                accountant = _rdp_accountant(self.sampling)
                for q, z, n in runs:
                    accountant.compose(_event(self.sampling, q, z, self.population), int(n))
                return float(accountant.get_epsilon(self.delta))
            total = None
            for q, z, n in runs:
                part = _pld(q, z, interval).self_compose(int(n))
                total = part if total is None else total.compose(part)
            return float(total.get_epsilon_for_delta(self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"runs": [list(r) for r in self.runs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runs = [[float(q), float(z), int(n)] for q, z, n in state.get("runs", [])]
        self._epsilon = None


def _merged(runs: list[list[float]]) -> tuple[tuple[float, float, int], ...]:
    """Runs with adjacent identical (q, z) joined and empty ones dropped: one key for one composition."""
    out: list[tuple[float, float, int]] = []
    for q, z, n in runs:
        if n <= 0:
            continue
        if out and out[-1][:2] == (q, z):
            out[-1] = (q, z, out[-1][2] + int(n))
        else:
            out.append((q, z, int(n)))
    return tuple(out)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism of multiplier ``sigma`` at ``delta`` (Balle and Wang 2018):
    delta(eps) = Phi(1/(2s) - eps*s) - e^eps * Phi(-1/(2s) - eps*s). T unsampled rounds of multiplier z are one
    Gaussian of multiplier z / sqrt(T), so PLD accounting of rounds without sampling needs no PLD at all (it would
    give this, discretised)."""
    from scipy.optimize import brentq
    from scipy.special import log_ndtr

    def excess(eps: float) -> float:
        a = log_ndtr(0.5 / sigma - eps * sigma)
        b = eps + log_ndtr(-0.5 / sigma - eps * sigma)
        return math.exp(a) * -math.expm1(b - a) - delta if b < a else -delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2.0
    return float(brentq(excess, 0.0, hi, xtol=1e-10, rtol=1e-12))


def calibrate(
    kind: AccountantKind | str, sampling: Sampling | str, epsilon: float, delta: float, q: float, rounds: int,
    population: int,
) -> float:  # fmt: skip
    """The smallest noise multiplier z (to 0.1%) whose ``rounds`` rounds at rate ``q`` stay within (epsilon,
    delta): a bisection on the accountant's own epsilon, so the run reports exactly what was calibrated."""
    accountant = Accountant(kind, delta, sampling, population)  # the same refusals as the run's
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"privacy.epsilon must be a finite number > 0, got {epsilon}")

    rate = 1.0 if accountant.sampling is Sampling.NONE else float(q)

    def eps(z: float) -> float:  # on the coarse grid: pessimistic, so the z found is safe on the fine one too
        accountant.check(z)
        return accountant._compute([[rate, z, rounds]], COARSE)

    lo = LOWEST_Z[accountant.kind.value]
    if eps(lo) <= epsilon:
        return lo  # a budget this loose is met with the least noise the accountant takes
    if accountant.kind is AccountantKind.PLD:  # RDP's z (cheap) bounds PLD's from above: bisect below it
        hi = calibrate(AccountantKind.RDP, sampling, epsilon, delta, q, rounds, population)
        lo = max(lo, hi / 2.0)
        while lo > LOWEST_Z["pld"] and eps(lo) <= epsilon:
            lo, hi = max(LOWEST_Z["pld"], lo / 2.0), lo
    else:
        hi = 2.0 * lo
        while eps(hi) > epsilon:
            lo, hi = hi, 2.0 * hi
            if hi > 1e6:
                raise ConfigError(f"privacy: no noise multiplier up to 1e6 reaches epsilon = {epsilon:g}")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return hi
