"""Secure-aggregation settings and the plan they give for a cohort of n parties.

The neighbour degree ``k`` and threshold ``t`` follow Bell et al. (CCS 2020, SecAgg+): each party Shamir-shares
its two secrets among its ``k`` neighbours in a k-regular graph (not with itself), and any ``t`` of those ``k``
shares reconstruct a secret. ``k = n - 1`` is the complete graph of Bonawitz et al.'s SecAgg.

Why ``k/2 < t``: a server that lies about dropouts tells some neighbours of party u that u is alive (to collect
shares of u's self-mask seed) and others that u dropped (to collect shares of u's mask key); with both it can
unmask u's input. An honest party answers for one kind only, so the server needs two disjoint sets of ``t``
neighbours, which do not exist among ``k`` when ``2t > k`` (Bonawitz et al. 2017, section 6; Bell et al. 2020,
section 4, where c colluding neighbours tighten it to ``2t > k + c``). ``t <= k`` so that the shares exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfleet.errors import ConfigError
from fedfleet.secagg import graph

MAX_BITS = 48  # float64 holds (x + clip) * (2**bits - 1) / (2 * clip) with fraction bits to spare up to here
WEIGHT_LEVELS_CAP = 2**52  # the weight's levels, likewise exact in float64


@dataclass(frozen=True)
class SecAggConfig:
    """``neighbours`` (k): each party's neighbours in the share graph; None = every other party (SecAgg).
    ``threshold`` (t): shares needed to rebuild a secret, counted among the k neighbours. An int is that count;
    a float f in [0.5, 1] means "more than f of the neighbours", t = min(floor(f * k) + 1, k), so the default 0.5
    is the smallest majority that keeps a lying server from collecting both kinds of share.
    ``clip``: every param of an update is clipped to [-clip, clip] before it is weight-scaled and quantised.
    ``bits``: 2**bits quantisation levels over [-clip, clip].
    ``max_weight``: a party's weight is capped here and scaled to f = min(weight, max_weight) / max_weight."""

    neighbours: int | None = None
    threshold: float | int = 0.5
    clip: float = 1.0
    bits: int = 16
    max_weight: float = 1000.0

    def validate(self, n_parties: int) -> Plan:
        """The plan for a cohort of ``n_parties``; a ConfigError naming the key and its bound otherwise."""
        n = n_parties
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"secure_aggregation needs at least 2 parties in a round, got {n!r}")
        k = self.neighbours
        if k is None:
            k = n - 1
        elif isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
            raise ConfigError(
                f"secure_aggregation.neighbours (k) must be an int with 1 <= k < n = {n} (the number of parties), "
                f"got {k!r}; leave it out for every other party (k = n - 1)"
            )
        degree = graph.degree(n, k)
        threshold = self._threshold(degree, n)
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure_aggregation.clip must be a finite number > 0, got {self.clip!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise ConfigError(f"secure_aggregation.bits must be an int in 1..{MAX_BITS}, got {self.bits!r}")
        if not (isinstance(self.max_weight, (int, float)) and math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"secure_aggregation.max_weight must be a finite number > 0, got {self.max_weight!r}")
        top = n * (2**self.bits - 1)  # the largest sum of n quantised values: it must not wrap the ring
        if top < 2**32:
            ring_bits = 32
        elif top < 2**64:
            ring_bits = 64
        else:
            most = max(b for b in range(1, MAX_BITS + 1) if n * (2**b - 1) < 2**64)
            raise ConfigError(
                f"secure_aggregation.bits = {self.bits} overflows the 64-bit ring for n = {n} parties: "
                f"n * (2**bits - 1) must be < 2**64, so bits <= {most} (or fewer parties per round)"
            )
        weight_levels = min((2**ring_bits - 1) // n, WEIGHT_LEVELS_CAP)
        return Plan(self, n, degree, threshold, ring_bits, weight_levels)

    def _threshold(self, degree: int, n: int) -> int:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ConfigError(f"secure_aggregation.threshold must be an int or a float, got {t!r}")
        if isinstance(t, float):
            if not 0.5 <= t <= 1.0:
                raise ConfigError(
                    f"secure_aggregation.threshold as a fraction must be in [0.5, 1] (more than that share of the "
                    f"neighbours; below one half a server that lies about dropouts can unmask a party), got {t!r}"
                )
            return threshold_of(t, degree)
        if not degree // 2 < t <= degree:
            raise ConfigError(
                f"secure_aggregation.threshold (t) must satisfy k/2 < t <= k, i.e. {degree // 2 + 1} <= t <= "
                f"{degree}, for k = {degree} neighbours of each of n = {n} parties (t > k/2 keeps a server that lies "
                f"about dropouts from collecting both kinds of share; Bell et al. 2020), got {t!r}"
            )
        return t


def ring32_bits(n_parties: int) -> int:
    """The most quantisation bits for which n parties' sum fits a 32-bit ring: the finest rounding whose masked
    upload is still the size of the fp32 update (what ``LocalFederation`` picks when the parties ask for it)."""
    bits = 1
    while bits < MAX_BITS and n_parties * (2 ** (bits + 1) - 1) < 2**32:
        bits += 1
    return bits


def for_parties(n_parties: int) -> SecAggConfig:
    """What ``FedArguments(aggregator="secure")`` asks for when nothing fixes the settings: the defaults, with the
    finest rounding a 32-bit ring holds for the session's ``n_parties`` (every party and the arbiter compute the
    same from the party count, so they agree without a word)."""
    return SecAggConfig(bits=ring32_bits(n_parties))


def check_cohorts(config: SecAggConfig, smallest: int, largest: int, key: str = "network.min_parties") -> None:
    """A round runs with the connected parties, at least ``smallest``: k and t must fit each count from there to
    ``largest`` (a ConfigError naming the key, the bound and the count, before anything starts)."""
    for n in range(max(smallest, 1), largest + 1):
        try:
            config.validate(n)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (a round may run with {n} parties: {key} is {smallest})") from None


def threshold_of(t: float | int, degree: int) -> int:
    """The share count for a graph of ``degree``: a fraction becomes more than that share of the neighbours; any
    count is raised to a strict majority (only needed when the degree was rounded up for parity)."""
    count = min(math.floor(t * degree) + 1, degree) if isinstance(t, float) else t
    return max(count, degree // 2 + 1)


@dataclass(frozen=True)
class Plan:
    """What every party and the server of one round agree on. ``degree`` and ``threshold`` are for the whole
    cohort; ``neighbourhood(m)`` gives them for the m parties that actually advertised keys. ``ring_bits`` is 32
    when n * (2**bits - 1) < 2**32 (masked inputs the size of fp32), else 64. The weight travels in one ring
    element with ``weight_levels`` levels, as many as n parties can sum without wrapping."""

    config: SecAggConfig
    n: int
    degree: int
    threshold: int
    ring_bits: int
    weight_levels: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    def neighbourhood(self, advertised: int) -> tuple[int, int]:
        """(degree, threshold) of the graph over ``advertised`` parties: the degree shrinks to m - 1 when fewer
        parties than k + 1 advertised; a fractional threshold is taken of that degree. Returns a threshold above
        the degree when the round cannot go on (the caller fails it)."""
        if advertised == self.n:
            return self.degree, self.threshold
        k = self.config.neighbours
        degree = graph.degree(advertised, advertised - 1 if k is None else min(k, advertised - 1))
        return degree, threshold_of(self.config.threshold, degree)
