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

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from fedfleet.core.aggregate import Aggregator
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update
from fedfleet.errors import ConfigError


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


@dataclass(frozen=True)
class AggregationContext:
    """What an aggregator that runs a protocol with the round's parties needs to know of the round (secure
    aggregation: who was asked to train, their links on the virtual clock, who is gone when it unmasks)."""

    round: int
    seed: int
    cohort: tuple[int | str, ...]  # the parties asked to train, in the order the round selected them
    latency: Callable[[int | str, int, int], float] | None = None  # (party, down bytes, up bytes) -> seconds
    offline_at_unmask: Callable[[Collection[int | str]], Collection[int | str]] | None = None


class SecureFold(Protocol):
    """Secure aggregation in the pipeline: it replaces the strategy's weighted mean by a sum it unmasks, so no
    fold transform can see an update (``fedfleet.secagg.SecureAggregation``)."""

    def aggregator(self, inner: Aggregator, global_params: FlatParams, context: AggregationContext) -> Aggregator: ...

    def native(self, inner: Aggregator) -> Aggregator:
        """The aggregator where the runtime runs the protocol with its parties and yields the unmasked sum as a
        ``Partial`` (the gRPC arbiter): ``inner`` itself, once it is checked to be a weighted mean."""
        ...


class StrategyAggregators(Protocol):
    def aggregator(self, global_params: FlatParams) -> Aggregator: ...


@dataclass(frozen=True)
class Pipeline:
    client: tuple[UpdateTransform, ...] = ()
    server: tuple[FoldTransform, ...] = ()
    secure: SecureFold | None = None  # secure aggregation: the arbiter sees only the sum

    def __post_init__(self) -> None:
        if self.secure is not None and not self.after_fold_only:
            names = ", ".join(type(t).__name__ for t in self.server if not getattr(t, "after_fold_only", False))
            raise ConfigError(
                f"secure aggregation hides each update from the arbiter, so the fold transforms ({names}) cannot "
                "see them: move per-update checks (clip) to the party side, or turn secure aggregation off"
            )

    @property
    def after_fold_only(self) -> bool:
        """Whether every fold transform looks only at the round's aggregate, never at an update (a privacy
        ledger): those compose with secure aggregation, and with partials of any kind."""
        return all(getattr(t, "after_fold_only", False) for t in self.server)

    @property
    def mergeable(self) -> bool:
        """Whether partial folds (Ray workers) may run the server chain where the updates are."""
        return self.secure is None and all(t.mergeable for t in self.server)

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

    def aggregator(
        self,
        strategy: StrategyAggregators,
        global_params: FlatParams,
        context: AggregationContext | None = None,
        secure_native: bool = False,
    ) -> Aggregator:
        """The round's aggregator: the strategy's own, inside the server chain (itself when the chain is empty),
        or secure aggregation's in its place (which needs the round's ``context``); ``secure_native``: the
        runtime unmasks the sum itself, and the strategy's own weighted mean merges it."""
        inner = strategy.aggregator(global_params)
        for transform in self.server:
            start = getattr(transform, "start_round", None)
            if start is not None:  # what a robust rule keeps of a round starts empty (a retried round too)
                start(global_params, inner)
        if self.secure is not None and secure_native:
            inner = self.secure.native(inner)
        elif self.secure is not None:
            if context is None:
                raise ConfigError("secure aggregation needs the round's parties: this runtime does not offer it")
            inner = self.secure.aggregator(inner, global_params, context)
        return PipelineAggregator(inner, self) if self.server else inner

    def round_metrics(self) -> dict[str, float]:
        """What the fold transforms report of the last round (privacy: epsilon, the clip norm, the noise)."""
        metrics: dict[str, float] = {}
        for transform in self.server:
            report = getattr(transform, "round_metrics", None)
            if report is not None:
                metrics.update(report())
        return metrics

    @property
    def stateful(self) -> bool:
        """Whether a fold transform remembers earlier rounds (centered clipping's centre): checkpoints carry it."""
        return any(hasattr(t, "state_dict") for t in self.server)

    def state_dict(self) -> dict[str, Any]:
        """The fold transforms' memory, each key prefixed by the transform's place in the chain."""
        state: dict[str, Any] = {}
        for i, transform in enumerate(self.server):
            if hasattr(transform, "state_dict"):
                state.update({f"{i}.{k}": v for k, v in transform.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, transform in enumerate(self.server):
            if hasattr(transform, "load_state_dict"):
                mine = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)}
                transform.load_state_dict(mine)


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
        if not isinstance(other, PipelineAggregator) and self.pipeline.after_fold_only:
            self.inner.merge(other)  # e.g. the gRPC arbiter's unmasked sum: these transforms see no update
            return
        if not isinstance(other, PipelineAggregator) or [type(t) for t in other.pipeline.server] != kinds:
            raise TypeError(f"cannot merge a {type(other).__name__} into an aggregator with other fold transforms")
        self.inner.merge(other.inner)
        self.left_out += other.left_out

    def finish(self) -> Aggregate:
        aggregate = self.pipeline.after_fold(self.inner.finish())
        if self.left_out:
            aggregate.metrics["left_out"] = float(self.left_out)
        return aggregate
