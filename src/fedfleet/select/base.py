"""Client selection: who trains this round. Selectors see only what a real server would know.

What a server knows: the registered population, who is checked in right now (``available``: the loop
passes it when the simulation has availability traces) and what selected clients reported back after
each round (``observe``, optional: loss, samples trained and response time of each selected client, see
:class:`fedfleet.core.round_end.RoundFeedback`). Never the hidden device or availability traces.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fedfleet.registry import Registry, construct


class Selector(Protocol):
    def select(self, population: int, k: int, round: int, seed: int) -> np.ndarray:
        """``k`` distinct client indices in ``[0, population)``, a pure function of (seed, round) and what the
        selector observed. A selector may take ``available=`` (sorted indices of the clients checked in
        now) and must then pick among them; one that does not is run over the checked-in clients by position.
        """
        ...


SELECTORS: Registry[type] = Registry("selector")


def build_selector(name: str, **params: object) -> Selector:
    return construct(SELECTORS.get(name), params, f"selector {name!r}")


def check_k(k: int, population: int, available: np.ndarray | None) -> None:
    pool = population if available is None else len(available)
    if not 0 < k <= pool:
        where = f"{population} clients" if available is None else f"{pool} checked-in clients"
        raise ValueError(f"cannot select {k} of {where}")
