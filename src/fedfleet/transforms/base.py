"""The transform registries and the pipeline built from a job's names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedfleet.core.pipeline import FoldTransform, Pipeline, UpdateTransform
from fedfleet.registry import Registry, construct

PARTY_TRANSFORMS: Registry[type[UpdateTransform]] = Registry("party-side transform")
FOLD_TRANSFORMS: Registry[type[FoldTransform]] = Registry("fold transform")


def build_pipeline(
    client: Sequence[tuple[str, dict[str, Any]]] = (), server: Sequence[tuple[str, dict]] = ()
) -> Pipeline:
    """A pipeline from (name, params) pairs, in order; an unknown name or parameter is a ConfigError."""
    return Pipeline(
        tuple(construct(PARTY_TRANSFORMS.get(n), p, f"transforms.client {n!r}") for n, p in client),
        tuple(construct(FOLD_TRANSFORMS.get(n), p, f"transforms.server {n!r}") for n, p in server),
    )
