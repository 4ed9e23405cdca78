"""An in-process federation: parties in threads of one process, folded by the same round loop as over gRPC.

``LocalFederation(2, strategy="fedyogi").context(i)`` gives party ``i`` a context with the shape of
``create_context``'s. An arbiter thread drives :class:`~fedfleet.core.loop.RoundLoop` with the job's strategy
(any registered one) over :class:`LocalRuntime`, a runtime whose parties are the threads: the same loop,
aggregation and server step as ``FedAvgServer`` over gRPC, so a notebook gives the model the deployed job
gives. Each party sends the delta from the round's global params, as a gRPC party does.

Every party must plan the same number of syncs (as the arbiter demands); a party whose training fails or
stops early leaves, and the others' next sync raises instead of waiting. ``timeout``: seconds a party (or
the arbiter) waits for the others at the start or a sync, and the error names who never arrived.
``reproducible``: the parties train in turns (between syncs, one after another), each with its own
random-number state seeded from its ``TrainingArguments.seed`` (Lightning: ``FedLightningCallback(seed=)``),
and the loop folds the updates in party order, so a seeded run gives the same bits every time. False lets
the parties train at once: faster where one party alone cannot use the machine, not reproducible.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
from fedfleet.core.params import FlatParams, ParamSpec, spec_difference
from fedfleet.core.pipeline import EMPTY, Pipeline, TransformContext
from fedfleet.core.update import NO_STATS, TrainStats, Update
from fedfleet.core.vocab import SessionVocabulary
from fedfleet.errors import ConfigError
from fedfleet.secagg.config import SecAggConfig, for_parties
from fedfleet.secagg.in_process import SecureAggregation
from fedfleet.select import build_selector
from fedfleet.strategy import Strategy, build_strategy
from fedfleet.sync.context import SyncChannel
from fedfleet.sync.turns import Turn


class LocalFederation:
    """In-process parties (threads) and an arbiter thread running the round loop; see the module's doc."""

    def __init__(
        self,
        parties: int,
        timeout: float | None = 600.0,
        reproducible: bool = True,
        strategy: Strategy | str = "fedavg",
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        pipeline: Pipeline | None = None,
        secure: SecAggConfig | None = None,
    ) -> None:
        """``secure``: SecAgg+ settings; every round is then securely aggregated. Without it, the rounds are when
        every party asks for it (``FedArguments(aggregator="secure")``), with the finest rounding a 32-bit ring
        holds for the parties."""
        if parties < 1:
            raise ConfigError("a local federation needs at least one party")
        self.size = parties
        self.timeout = timeout
        self.reproducible = reproducible
        self.strategy = build_strategy(strategy) if isinstance(strategy, str) else strategy
        self.seed = seed
        self.callbacks = list(callbacks)
        self.pipeline = pipeline  # its fold transforms, as FedAvgServer(pipeline=) runs them
        self.secure = secure
        self._secure: dict[int, bool] = {}  # whether each party asked for secure aggregation
        self.loop: RoundLoop | None = None
        self._cv = threading.Condition()
        self._floor = threading.Lock()  # held by the party whose turn it is to train
        self._initial: FlatParams | None = None
        self._planned: dict[int, int] = {}
        self._vocabs: dict[int, str] = {}  # each party's vocabulary fingerprint ("" = no tokenizer)
        self._failed: str | None = None  # why the federation cannot go on
        self._arrived: dict[int, Update] = {}  # this round's updates, by party
        self._task: tuple[int, FlatParams] | None = None  # (round, its global params); round == rounds: the end
        self._arbiter: threading.Thread | None = None

    def context(self, index: int) -> LocalContext:
        if not 0 <= index < self.size:
            raise ConfigError(f"party index {index}: this federation has parties 0..{self.size - 1}")
        return LocalContext(self, index)

    @property
    def rounds(self) -> int:
        """Rounds committed so far."""
        return self.loop.round if self.loop is not None else 0

    @property
    def history(self) -> list[RoundRecord]:
        """The arbiter's record of every committed round (the parties' mean loss, clients, wall time)."""
        return self.loop.history if self.loop is not None else []

    # -- the parties' side (called by LocalChannel, holding nothing) ------------------------------------
    def _start(
        self, index: int, params: FlatParams, rounds: int, timeout: float | None, vocab: str = "", secure: bool = False
    ) -> int:
        """Register, check the plan, layout, vocabulary and aggregation, wait for round 0's params; returns the
        party's round."""
        with self._cv:
            self._planned[index] = rounds
            self._vocabs[index] = vocab
            self._secure[index] = secure
            if index == 0:  # every party starts from party 0's params, as over gRPC from the first to join
                self._initial = params.clone()
            self._cv.notify_all()
            self._wait(lambda: len(self._planned) == self.size, "at the start", self._planned, timeout)
            if params.spec != self._initial.spec:
                raise ConfigError(
                    f"party-{index}'s model has another param layout than party-0's (is it the same architecture?): "
                    f"{spec_difference(self._initial.spec, params.spec)}"
                )
            self._check_vocab(index)
            self._check_secure()
            plans = {r for r in self._planned.values() if r > 0}
            if len(plans) > 1:
                listed = ", ".join(f"party-{i}: {r}" for i, r in sorted(self._planned.items()))
                raise ConfigError(
                    f"the parties plan different numbers of syncs ({listed}); give every party the same "
                    "epochs or max_steps and FedArguments, or the others would wait forever for the last syncs"
                )
            if self._arbiter is None:
                if self.secure is not None or any(self._secure.values()):
                    config = self.secure or for_parties(self.size)
                    self.pipeline = replace(self.pipeline or EMPTY, secure=SecureAggregation(config, "local"))
                self._arbiter = threading.Thread(
                    target=self._serve, args=(max(plans, default=0),), name="local-arbiter", daemon=True
                )
                self._arbiter.start()
            return self._take(0, params, "at the start", timeout)

    def _check_vocab(self, index: int) -> None:
        """The parties' token ids must mean the same (core.vocab); checked in party order, as gRPC joins are."""
        session = SessionVocabulary()
        for i, vocab in sorted(self._vocabs.items()):
            reason = session.check(f"party-{i}", vocab)
            if reason and i == index:
                raise ConfigError(reason)

    def _check_secure(self) -> None:
        """Every party asks for the same aggregation (as FATE-LLM demands of FedArguments), unless the federation
        fixed it: a party that believes it is masked must not be summed in the clear."""
        asked = {i for i, s in self._secure.items() if s}
        if asked and len(asked) < self.size and self.secure is None:
            plain = ", ".join(f"party-{i}" for i in sorted(set(range(self.size)) - asked))
            raise ConfigError(
                f"{', '.join(f'party-{i}' for i in sorted(asked))} ask for aggregator='secure' and {plain} for "
                "'plain': give every party the same FedArguments(aggregator=...), or LocalFederation(secure=...)"
            )

    def _sync(self, index: int, update: Update, round: int, timeout: float | None, into: FlatParams) -> int:
        """Hand in ``update`` for ``round`` and load the next global params into ``into``; returns the next round."""
        with self._cv:
            if self._failed is not None:
                raise RuntimeError(f"the federation cannot go on: {self._failed}")
            self._arrived[index] = update  # the party leaves its delta untouched until the next task comes
            self._cv.notify_all()
            return self._take(round + 1, into, f"at sync {round + 1}", timeout)

    def _take(self, round: int, into: FlatParams, what: str, timeout: float | None) -> int:
        """Wait (holding the condition) for the global params of ``round`` and copy them into ``into``."""
        waiting = self._arrived if round > 0 else {}
        self._wait(lambda: self._task is not None and self._task[0] >= round, what, waiting, timeout)
        into.copy_(self._task[1])  # before the loop can move on: it waits for this party's next update
        return self._task[0]

    def fail(self, reason: str) -> None:
        """End the federation before its end: every party waiting, or yet to start, raises with ``reason``."""
        with self._cv:
            if self._failed is None:
                self._failed = reason
            self._cv.notify_all()

    def _leave(self, index: int, syncs: int, rounds: int) -> None:
        with self._cv:
            if self._failed is None:
                self._failed = f"party-{index} left after {syncs} of {rounds} syncs (its training failed or stopped)"
            self._cv.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str, here: Collection[int], timeout: float | None) -> None:
        """Wait (holding the condition) until ``ready`` or the federation failed; raise on either failure.
        ``here``: the parties that have arrived (the error names the others)."""
        limit = self.timeout if timeout is None else timeout
        if not self._cv.wait_for(lambda: ready() or self._failed is not None, limit):
            missing = ", ".join(f"party-{i}" for i in range(self.size) if i not in here)
            raise TimeoutError(f"waited {limit:g} s {what} for {missing}; did its training start, or hang?")
        if self._failed is not None and not ready():
            raise RuntimeError(f"the federation cannot go on: {self._failed}")

    # -- the arbiter's side ----------------------------------------------------------------------------
    def _serve(self, rounds: int) -> None:
        """The arbiter thread: the round loop over the parties, then the final params to every party."""
        try:
            self.loop = RoundLoop(
                self.strategy,
                LocalRuntime(self),
                build_selector("uniform"),
                self._initial,
                FitConfig(),
                LoopConfig(rounds=rounds, cohort=self.size, seed=self.seed, eval_every=0, max_attempts=1),
                self.callbacks,
                pipeline=self.pipeline,
            )
            self.loop.run()
            self._publish(rounds, self.loop.global_params)
        except BaseException as exc:  # the parties raise with the reason instead of waiting for a task
            with self._cv:
                if self._failed is None:
                    self._failed = f"the arbiter failed: {type(exc).__name__}: {exc}"
                self._cv.notify_all()

    def _publish(self, round: int, params: FlatParams) -> None:
        with self._cv:
            self._arrived = {}
            self._task = (round, params)
            self._cv.notify_all()


class LocalRuntime:
    """The round loop's runtime over a :class:`LocalFederation`'s parties: a round hands each party the global
    params and yields their updates in party order as they sync (so the fold's float sum is the same whichever
    thread arrives first). Moves params, never computes with them."""

    parties_in_process = True  # secure aggregation can play the parties here (secagg.in_process)

    virtual_clock = False  # the parties are real trainers in threads: wall time only

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation

    @property
    def population(self) -> int:
        return self.federation.size

    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]:
        fed = self.federation
        fed._publish(config.round, global_params)
        for index in clients:
            with fed._cv:
                fed._wait(lambda i=index: i in fed._arrived, f"for round {config.round + 1}", fed._arrived, None)
                update = fed._arrived[index]
            yield update

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        return {}  # the parties evaluate on their own data

    def round_metrics(self) -> dict[str, float]:
        return {}


class LocalContext:
    def __init__(self, federation: LocalFederation, index: int) -> None:
        self.federation = federation
        self.index = index
        self.name = f"party-{index}"
        self.is_arbiter = False

    def channel(
        self,
        spec: ParamSpec,
        rounds: int,
        pipeline: Pipeline | None = None,
        seed: int = 0,
        vocab: str = "",
        secure: bool = False,
    ) -> SyncChannel:
        return LocalChannel(self.federation, self.index, rounds, pipeline, seed, vocab, secure)

    def turn(self, seed: int) -> Turn | None:
        """What makes this party's run reproducible in a shared process (None: the parties overlap freely)."""
        return Turn(self.federation._floor, seed) if self.federation.reproducible else None


class LocalChannel:
    """A party's end: it keeps the global params of its round (one model-sized buffer, as a gRPC party's inbox)
    and sends the delta from them, computed in that buffer."""

    def __init__(
        self,
        federation: LocalFederation,
        index: int,
        rounds: int,
        pipeline: Pipeline | None = None,
        seed: int = 0,
        vocab: str = "",
        secure: bool = False,
    ) -> None:
        self.federation, self.index, self.rounds, self.syncs = federation, index, rounds, 0
        self.vocab = vocab  # the fingerprint of the party's token ids
        self.secure = secure  # it asked for secure aggregation
        self.pipeline, self.seed = pipeline or EMPTY, seed  # party-side transforms on each delta
        self._base: FlatParams | None = None
        self._round = 0
        self._closed = False

    def start(self, params: FlatParams, timeout: float | None = None) -> FlatParams:
        self._round = self.federation._start(self.index, params, self.rounds, timeout, self.vocab, self.secure)
        self._base = params.clone()
        return params

    def sync(
        self,
        params: FlatParams,
        weight: float,
        metrics: dict[str, float] | None = None,
        timeout: float | None = None,
        stats: TrainStats | None = None,
    ) -> bool:
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        if self._base is None:
            raise RuntimeError("sync() before start()")
        delta = self._base.mul_(-1.0).add_(params)  # local - global, in the round's buffer
        update = Update(delta, float(weight), dict(metrics or {}), client_id=self.index, stats=stats or NO_STATS)
        update = self.pipeline.on_party(update, TransformContext(self._round, self.index, self.seed))
        self._round = self.federation._sync(self.index, update, self._round, timeout, params)
        self._base.copy_(params)
        self.syncs += 1
        return self.syncs < self.rounds

    def close(self) -> None:
        if not self._closed and self.syncs < self.rounds:  # leaving early: the others must not wait for us
            self.federation._leave(self.index, self.syncs, self.rounds)
        self._closed = True
