"""From a ``privacy:`` section and the job's shape to the transforms that keep the budget."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedfleet.privacy.accountant import Accountant, Sampling, calibrate
from fedfleet.privacy.budget import Budget
from fedfleet.privacy.central import CentralGaussian
from fedfleet.privacy.config import PrivacyConfig
from fedfleet.privacy.ledger import PrivacyLedger
from fedfleet.privacy.noise import NoiseSource
from fedfleet.privacy.party import PartyGaussian

log = logging.getLogger("fedfleet.privacy")


@dataclass(frozen=True)
class PrivacyPlan:
    """The noise multiplier (given or calibrated), the sampling rate the accountant assumes, the expected updates
    per round (the fixed denominator), and the transforms: ``party`` before sending, ``fold`` at the arbiter."""

    config: PrivacyConfig
    noise_multiplier: float
    sampling_rate: float
    expected_count: float
    rounds: int
    party: tuple[Any, ...]
    fold: tuple[Any, ...]

    def describe(self) -> str:
        c = self.config
        budget = f"epsilon <= {c.epsilon:g}" if c.epsilon is not None else "no budget"
        return (f"privacy ({c.where}): noise multiplier {self.noise_multiplier:.4g}, clip {c.clip:g}"
                f"{' (adaptive)' if c.adaptive else ''}, {c.sampling} sampling at q = {self.sampling_rate:.4g}, "
                f"{budget} at delta {c.delta:g} over {self.rounds} rounds ({c.accountant.upper()})")  # fmt: skip


@lru_cache(maxsize=16)
def _calibrated(config: PrivacyConfig, q: float, rounds: int, population: int) -> float:
    return calibrate(config.accountant, config.sampling, config.epsilon, config.delta, q, rounds, population)


def plan_privacy(
    config: PrivacyConfig, rounds: int, cohort: int, population: int, seed: int = 0, party_weight: float = 1.0
) -> PrivacyPlan:
    """``cohort``: updates a round expects; ``population``: the clients sampled from; ``party_weight``: the
    weight each noised update carries (secure aggregation's max_weight, so its weight scaling loses nothing)."""
    # local DP: the arbiter knows who sent what, so sampling amplifies nothing
    sampling = Sampling.NONE if config.where == "local" else Sampling(config.sampling)
    q = 1.0 if sampling is Sampling.NONE else cohort / population
    z = config.noise_multiplier
    calibrated = z is None
    if calibrated:
        z = _calibrated(dataclasses.replace(config, sampling=sampling.value), q, rounds, population)
        if config.where == "local":  # each round is a Gaussian of multiplier z / 2 there (sensitivity 2 C)
            z *= 2.0
    accountant = Accountant(config.accountant, config.delta, sampling, population)
    accountant.check(z / 2.0 if config.where == "local" else z)
    budget = None
    if config.epsilon is not None:
        per_round = z / 2.0 if config.where == "local" else z  # what the accountant composes each round
        budget = Budget(config.epsilon, rounds if calibrated else 0, q, per_round)
    noise = NoiseSource(config.noise)
    party: tuple[Any, ...] = ()
    if config.where == "central":
        central = CentralGaussian(
            z, cohort, config.clip, config.per_layer, config.adaptive, noise, seed, q, accountant, budget
        )
        fold: tuple[Any, ...] = (central,)
    else:
        std = z * config.clip / (math.sqrt(cohort) if config.where == "distributed" else 1.0)
        party = (PartyGaussian(config.clip, std, config.per_layer, party_weight, noise, seed),)
        fold = (PrivacyLedger(config.where, z, cohort, q, accountant, budget),)
    plan = PrivacyPlan(config, z, q, float(cohort), rounds, party, fold)
    _announce(plan.describe())
    return plan


@lru_cache(maxsize=16)
def _announce(line: str) -> None:
    """Log a plan once: a job builds its pipeline for the trainer and again for the loop."""
    log.info("%s", line)
