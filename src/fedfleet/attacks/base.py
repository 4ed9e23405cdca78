"""Which simulated clients misbehave: a fixed, seeded fraction of the population, the same in every round.

With the job's population N known (the pipeline gets it from ``data.clients``), exactly round(fraction x N)
clients are attackers: the first of a permutation of 0..N-1 drawn from the seed (the job's, unless the
attack names its own). A round's cohort then holds as many as the selection happens to draw, as it would in a
real federation: that is the point of a fixed population fraction (a per-cohort fraction would need each
client to know who else was selected). Without a population, or for a named party (a string id), each client
draws alone from a hash of (seed, id): the fraction holds in expectation.

An attacker's update carries ``attacker: 1`` in its metrics (0 for the honest), so the round's table shows
the attackers' share of the weight (``train_attacker``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedfleet.core.pipeline import TransformContext
from fedfleet.core.seeding import derive_seed
from fedfleet.core.update import Update

ATTACK = 7  # the seed stream of attack decisions, apart from selection (1), training (2), evaluation (3)


@dataclass(frozen=True, kw_only=True)
class Attack:
    """Base of the attacker behaviours: ``fraction`` of the clients apply ``corrupt`` to their update."""

    fraction: float = 0.1  # of the population, 0 to 1
    seed: int | None = None  # who attacks; default: the job's seed
    population: int | None = None  # the clients; default: the job's data.clients

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction must be a number from 0 to 1, got {f!r}")
        for key in ("seed", "population"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")

    def for_population(self, population: int | None, seed: int) -> Attack:
        """This attack for a job of ``population`` clients and ``seed`` (what the attack leaves unset)."""
        return dataclasses.replace(
            self,
            population=self.population if self.population is not None else population,
            seed=self.seed if self.seed is not None else seed,
        )

    @cached_property
    def attackers(self) -> frozenset[int] | None:
        """The attacking clients' ids, or None when the population is unknown."""
        if self.population is None:
            return None
        count = round(self.fraction * self.population)
        order = np.random.default_rng(derive_seed(self.seed or 0, ATTACK)).permutation(self.population)
        return frozenset(int(c) for c in order[:count])

    def attacks(self, client: int | str) -> bool:
        if self.fraction >= 1.0:
            return True
        if self.attackers is not None and isinstance(client, (int, np.integer)):
            return int(client) in self.attackers
        digest = hashlib.blake2b(f"{self.seed or 0}:{client}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < self.fraction

    def __call__(self, update: Update, context: TransformContext) -> Update:
        bad = self.attacks(context.client_id)
        update.metrics["attacker"] = float(bad)
        return self.corrupt(update, context) if bad else update

    def corrupt(self, update: Update, context: TransformContext) -> Update:
        raise NotImplementedError
