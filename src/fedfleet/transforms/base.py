"""The transform registries and the pipeline built from a job's names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedfleet.core.pipeline import FoldTransform, Pipeline, UpdateTransform
from fedfleet.errors import ConfigError
from fedfleet.registry import Registry, construct

PARTY_TRANSFORMS: Registry[type[UpdateTransform]] = Registry("party-side transform")
FOLD_TRANSFORMS: Registry[type[FoldTransform]] = Registry("fold transform")


@dataclass(frozen=True)
class JobFacts:
    """What a job says that its transforms check themselves against when the pipeline is built: the updates a
    round folds (``cohort``; ``cohort_key`` names where that number is set) and the clients (``population``)."""

    cohort: int | None = None
    cohort_key: str = "cohort"
    population: int | None = None
    seed: int = 0


def build_pipeline(
    client: Sequence[tuple[str, dict[str, Any]]] = (),
    server: Sequence[tuple[str, dict]] = (),
    job: JobFacts | None = None,
) -> Pipeline:
    """A pipeline from (name, params) pairs, in order; an unknown name or parameter is a ConfigError, and so is a
    transform whose precondition the job's cohort breaks (Krum's n >= 2f + 3). A party-side transform with
    ``for_population`` (an attack) is given the job's population and seed; a fold transform with
    ``check_cohort`` checks the job's cohort."""
    facts = job or JobFacts()
    party = []
    for name, params in client:
        what = f"transforms.client {name!r}"
        transform = construct(PARTY_TRANSFORMS.get(name), params, what)
        if hasattr(transform, "for_population"):
            transform = transform.for_population(facts.population, facts.seed)
        party.append(transform)
    fold = []
    for name, params in server:
        what = f"transforms.server {name!r}"
        transform = construct(FOLD_TRANSFORMS.get(name), params, what)
        if facts.cohort is not None and hasattr(transform, "check_cohort"):
            try:
                transform.check_cohort(facts.cohort, facts.cohort_key)
            except ValueError as exc:
                raise ConfigError(f"{what}: {exc}") from None
        fold.append(transform)
    return Pipeline(tuple(party), tuple(fold))
