"""Client selection: who trains this round. Selectors see only what a real server would know."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fedfleet.registry import Registry, construct


class Selector(Protocol):
    def select(self, population: int, k: int, round: int, seed: int) -> np.ndarray:
        """``k`` distinct client indices in ``[0, population)``, a pure function of (seed, round)."""
        ...


SELECTORS: Registry[type] = Registry("selector")


def build_selector(name: str, **params: object) -> Selector:
    return construct(SELECTORS.get(name), params, f"selector {name!r}")
