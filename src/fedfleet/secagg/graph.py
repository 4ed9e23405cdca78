"""The share graph: a seeded k-regular graph that every party computes alike from (ids, k, seed).

The ids are sorted, then permuted by a numpy generator seeded with the round's graph seed (the graph is public,
so it needs no secret randomness, only one that all parties reproduce), and laid on a circle: each party links
to the k/2 nearest on either side (a circulant, or Harary, graph). An odd k on an even n also links the party
opposite. A k-regular graph needs n * k even, so for an odd n and an odd k the degree is rounded up to k + 1
(``degree`` says so; k + 1 <= n - 1 always holds then). k = n - 1 is the complete graph.

A server that picks the seed could grind for a graph it likes; Bell et al. have it drawn by the parties. Here the
arbiter announces it, which is enough against a server that follows the protocol (the semi-honest model).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def degree(n: int, k: int) -> int:
    """The degree of the graph built for n parties asked for k neighbours each (1 <= k <= n - 1, or 0 for one
    party): k, or k + 1 when n and k are both odd."""
    if n <= 1:
        return 0
    k = min(k, n - 1)
    return k + 1 if n % 2 and k % 2 else k


def neighbours(ids: Iterable[int], k: int, seed: int) -> dict[int, frozenset[int]]:
    """Each id's neighbours in the graph of degree ``degree(len(ids), k)`` (what the server needs)."""
    ring, offsets = _layout(ids, k, seed)
    n = len(ring)
    return {ring[p]: frozenset(ring[(p + o) % n] for o in offsets) for p in range(n)}


def neighbours_of(ids: Iterable[int], k: int, seed: int, party: int) -> frozenset[int]:
    """One party's neighbours in the same graph, in O(n) instead of O(n * k) (what each party needs)."""
    ring, offsets = _layout(ids, k, seed)
    p = ring.index(party)
    return frozenset(ring[(p + o) % len(ring)] for o in offsets)


def _layout(ids: Iterable[int], k: int, seed: int) -> tuple[list[int], list[int]]:
    """The ids in their seeded order around the circle, and the offsets each links to."""
    order = sorted(set(ids))
    n = len(order)
    d = degree(n, k)
    if d == n - 1:  # complete: no order needed
        return order, list(range(1, n))
    ring = [order[p] for p in np.random.default_rng(seed).permutation(n)]
    offsets = list(range(1, d // 2 + 1)) + list(range(n - d // 2, n))
    if d % 2:  # only when n is even (see degree): the party opposite
        offsets.append(n // 2)
    return ring, offsets
