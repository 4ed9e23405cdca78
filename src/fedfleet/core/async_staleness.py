"""How much a stale update counts in asynchronous aggregation: staleness functions, by name, and the pure weight.

Staleness ``s`` is the number of server steps committed since the client downloaded the model it trained
from (0: it trained from the current model). FedBuff (Nguyen et al., AISTATS 2022) scales each buffered
delta by ``1 / sqrt(1 + s)``; FedAsync (Xie et al. 2019) proposed the polynomial and hinge families.

    constant     1                                       (no discount: FedBuff's ablation)
    polynomial   (1 + s) ** -exponent                    (exponent 0.5: FedBuff's default, 1 / sqrt(1 + s))
    hinge        1 if s <= b, else 1 / (a * (s - b) + 1)  (FedAsync: free up to b steps late, then falls fast)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from fedfleet.registry import Registry, construct


class StalenessFn(Protocol):
    def __call__(self, staleness: int) -> float:
        """The factor in (0, 1] that scales an update ``staleness`` server steps old."""
        ...


STALENESS: Registry[type] = Registry("staleness function")


@STALENESS.register("constant")
@dataclass(frozen=True)
class Constant:
    def __call__(self, staleness: int) -> float:
        return 1.0


@STALENESS.register("polynomial")
@dataclass(frozen=True)
class Polynomial:
    exponent: float = 0.5

    def __post_init__(self) -> None:
        if not (self.exponent >= 0 and math.isfinite(self.exponent)):
            raise ValueError(f"exponent must be a finite number >= 0, got {self.exponent} (0.5: 1 / sqrt(1 + s))")

    def __call__(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.exponent)


@STALENESS.register("hinge")
@dataclass(frozen=True)
class Hinge:
    a: float = 10.0  # how fast the factor falls after b
    b: int = 4  # steps of staleness that cost nothing

    def __post_init__(self) -> None:
        if not self.a > 0:
            raise ValueError(f"a must be > 0, got {self.a}")
        if self.b < 0:
            raise ValueError(f"b must be >= 0, got {self.b}")

    def __call__(self, staleness: int) -> float:
        return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)


def build_staleness(name: str, **params: object) -> StalenessFn:
    return construct(STALENESS.get(name), params, f"staleness {name!r}")


def arrival_factor(fn: StalenessFn, staleness: int, examples: float, by_examples: bool) -> tuple[float, float]:
    """(scale, weight) of one arrival in the buffer's mean ``sum_k scale_k * delta_k / sum_k weight_k``.

    ``weight`` is the example count (or 1); ``scale`` is that weight times the staleness factor. The factor
    is kept out of the denominator on purpose, as in FedBuff (which divides by the buffer size K): a buffer
    of stale updates moves the model less, instead of being renormalised back to full strength.
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    weight = float(examples) if by_examples else 1.0
    return weight * fn(staleness), weight
