"""The aggregation pipeline: one ordered chain of update transforms around the strategy's aggregator.

    party:   local training -> client transforms (clip, quantise, mask, add noise) -> send
    arbiter: validate (the runtime's gate) -> fold transforms' before_fold (clip, filter, unmask)
             -> the strategy's aggregator (add / merge / finish) -> fold transforms' after_fold (noise,
             robust combine) -> the strategy's server step

Every runtime runs the same chain: the round loop builds the round's aggregator through
:meth:`Pipeline.aggregator`; whoever trains (the in-process trainer, a Ray worker, a deployed party) applies
:meth:`Pipeline.on_party` to its update before it leaves. A transform is one file and one registration in
``fedfleet.transforms``; it composes with any strategy.

A fold transform whose ``before_fold`` looks at one update at a time is ``mergeable``: it may run where
updates are folded into a partial (a Ray worker's share), since merging partials then equals folding every
transformed update at the top. One that needs every update at once (a median) is not, and its runtime then
sends one update per client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fedfleet.core.aggregate import Aggregator
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update


@dataclass(frozen=True)
class TransformContext:
    """Where a party-side transform runs: the round, the party (client id) and the round's seed, from which a
    randomised transform (noise, masks) derives its generator."""

    round: int
    client_id: int | str
    seed: int


class UpdateTransform(Protocol):
    """Party side, on an update about to be sent. May change ``update.params`` in place (the runtime's buffer)
    and return the same update, or return a new one."""

    def __call__(self, update: Update, context: TransformContext) -> Update: ...


class FoldTransform(Protocol):
    """Arbiter side, around the fold. ``before_fold`` returns the update to fold (possibly changed), or None to
    leave it out; ``after_fold`` may change the round's aggregate before the server step."""

    mergeable: bool

    def before_fold(self, update: Update) -> Update | None: ...

    def after_fold(self, aggregate: Aggregate) -> Aggregate: ...


class StrategyAggregators(Protocol):
    def aggregator(self, global_params: FlatParams) -> Aggregator: ...


@dataclass(frozen=True)
class Pipeline:
    client: tuple[UpdateTransform, ...] = ()
    server: tuple[FoldTransform, ...] = ()

    @property
    def mergeable(self) -> bool:
        """Whether partial folds (Ray workers) may run the server chain where the updates are."""
        return all(t.mergeable for t in self.server)

    def on_party(self, update: Update, context: TransformContext) -> Update:
        for transform in self.client:
            update = transform(update, context)
        return update

    def before_fold(self, update: Update) -> Update | None:
        """The server chain's view of one update: the update to fold, or None when a transform leaves it out."""
        for transform in self.server:
            kept = transform.before_fold(update)
            if kept is None:
                return None
            update = kept
        return update

    def after_fold(self, aggregate: Aggregate) -> Aggregate:
        for transform in self.server:
            aggregate = transform.after_fold(aggregate)
        return aggregate

    def aggregator(self, strategy: StrategyAggregators, global_params: FlatParams) -> Aggregator:
        """The round's aggregator: the strategy's own, inside the server chain (itself when the chain is empty)."""
        inner = strategy.aggregator(global_params)
        return PipelineAggregator(inner, self) if self.server else inner


EMPTY = Pipeline()


class PipelineAggregator:
    """An aggregator with the fold transforms around it; ``left_out`` counts the updates they dropped."""

    def __init__(self, inner: Aggregator, pipeline: Pipeline) -> None:
        self.inner = inner
        self.pipeline = pipeline
        self.left_out = 0

    def add(self, update: Update) -> None:
        kept = self.pipeline.before_fold(update)
        if kept is None:
            self.left_out += 1
        else:
            self.inner.add(kept)

    def merge(self, other: Any) -> None:
        # by kind, not equality: a partial shipped from a Ray worker carries unpickled copies of the transforms
        kinds = [type(t) for t in self.pipeline.server]
        if not isinstance(other, PipelineAggregator) or [type(t) for t in other.pipeline.server] != kinds:
            raise TypeError(f"cannot merge a {type(other).__name__} into an aggregator with other fold transforms")
        self.inner.merge(other.inner)
        self.left_out += other.left_out

    def finish(self) -> Aggregate:
        aggregate = self.pipeline.after_fold(self.inner.finish())
        if self.left_out:
            aggregate.metrics["left_out"] = float(self.left_out)
        return aggregate
