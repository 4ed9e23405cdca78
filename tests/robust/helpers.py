"""Seeded synthetic rounds for the robust aggregators: honest updates around a mean, attackers among them."""

from __future__ import annotations

import torch

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update
from fedfleet.strategy import build_strategy
from fedfleet.transforms import JobFacts, build_pipeline


def honest(k: int, dim: int = 64, spread: float = 0.1, seed: int = 0) -> torch.Tensor:
    """(k, dim) honest deltas: a shared direction of norm ~ sqrt(dim) / 4 plus per-client noise."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=gen) / 4
    return mu + spread * torch.randn(k, dim, generator=gen)


ATTACKS = {
    "sign_flip": lambda x: -x,  # each attacker flips its own honest delta
    "scale_10": lambda x: 10 * x,  # boosted (model replacement)
    "flip_scale_100": lambda x: -100 * x,  # flipped and boosted
}


def with_attackers(h: torch.Tensor, f: int, attack: str) -> torch.Tensor:
    """The round's rows: f attackers (who corrupt their own honest delta) first, then the honest ones."""
    gen = torch.Generator().manual_seed(1)
    theirs = h.mean(0) + 0.1 * torch.randn(f, h.shape[1], generator=gen)
    return torch.cat([ATTACKS[attack](theirs), h])


def as_update(row: torch.Tensor, client: int, weight: float = 1.0) -> Update:
    return Update(FlatParams.from_tensors({"w": row.clone()}), weight, client_id=client)


def aggregate(name: str, params: dict, rows: torch.Tensor, weights=None, strategy: str = "fedavg") -> Aggregate:
    """One round of ``rows`` through the rule ``name`` in front of ``strategy``'s weighted mean."""
    pipeline = build_pipeline(server=[(name, params)], job=JobFacts(cohort=len(rows)))
    agg = pipeline.aggregator(build_strategy(strategy), FlatParams.from_tensors({"w": torch.zeros(rows.shape[1])}))
    for i, row in enumerate(rows):
        agg.add(as_update(row, i, 1.0 if weights is None else weights[i]))
    return agg.finish()


def result(out: Aggregate) -> torch.Tensor:
    return out.params.tensors()["w"]
