"""The gRPC runtime: the round loop's ``fit`` and ``evaluate`` executed by parties over the network.

Server-driven (``tasks`` mode): for each round the arbiter sends every selected, connected party a task
(the training config with the party's seed) followed by the global params in chunks, then yields the
updates as they pass validation. Party-driven (``sync`` mode, for stateful trainers such as the Hugging
Face Trainer): the round starts by sending each selected party the global params, and the parties answer
whenever their own training reaches a sync point; after the last round they receive the final params.
Either way a round ends when every selected party has answered, failed, been rejected or left, or at
``round_timeout``; with fewer than ``min_parties`` good updates it is retried from scratch. With
``secure_aggregation`` every round, server-driven or party-paced, is a SecAgg+ round (``secure_runtime.py``): the
arbiter sees only masked inputs and yields their unmasked weighted sum as one ``Partial``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import statistics
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fedfleet.core.aggregate import MetricMean
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import RoundIncomplete
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Partial, TrainStats, Update
from fedfleet.errors import UserError
from fedfleet.runtime.grpc.arbiter import ArbiterServer, Event, EventKind
from fedfleet.runtime.grpc.chunks import DEFAULT_CHUNK_BYTES
from fedfleet.runtime.grpc.links import PartyLink
from fedfleet.runtime.grpc.wire import Done, JoinMode, Notice, Task, TaskKind
from fedfleet.runtime.sim.sequential import client_seed

if TYPE_CHECKING:
    from fedfleet.secagg.config import SecAggConfig

log = logging.getLogger("fedfleet.arbiter")


MAX_METRIC_NAMES = 256  # distinct names the parties' metrics may bring to a session's table


class PartiesMissingError(UserError):
    """Not enough parties connected in time."""


class GrpcRuntime:
    virtual_clock = False  # real parties on real links: rounds take wall time only

    def __init__(
        self,
        server: ArbiterServer,
        *,
        min_parties: int,
        round_timeout: float,
        join_timeout: float,
        wait_timeout: float,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        evaluator: Any = None,
        federated_eval: bool = True,
        max_weight_ratio: float | None = None,
        secure_aggregation: SecAggConfig | None = None,
    ) -> None:
        """``secure_aggregation``: every round runs SecAgg+ with the parties, server-driven or party-paced (the
        server must be a ``SecureArbiterServer`` of the same settings, which checks every party's at join)."""
        self.server = server
        self.secure(secure_aggregation)
        self.min_parties = min_parties
        self.round_timeout = round_timeout
        self.join_timeout = join_timeout
        self.wait_timeout = wait_timeout
        self.chunk_bytes = chunk_bytes
        self.evaluator = evaluator  # a central (trainer, test data) pair, or None
        self.federated_eval = federated_eval
        self._round = 0
        self._metrics: dict[str, float] = {}
        self._metric_names: set[str] = set()  # every name a party's metrics have shown in this session
        self._dropped_names = 0
        self.max_weight_ratio = max_weight_ratio
        self._last_weight: dict[str, float] = {}  # each party's latest accepted training weight
        self._clamped = 0

    def secure(self, config: SecAggConfig | None) -> None:
        """Run the rounds with secure aggregation of ``config`` (None: plain), set before the round loop is built
        (a party-paced session knows it once its parties joined)."""
        self.secure_aggregation = config
        # the round loop then folds the unmasked sum this runtime yields, instead of masking in process
        self.secure_aggregation_native = config is not None

    @property
    def population(self) -> int:
        return len(self.server.parties)

    # -- Runtime protocol --------------------------------------------------------------------------
    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update | Partial]:
        self._round = config.round
        self.server.current_round = config.round
        self._dropped_names = self._clamped = 0
        names = [self.server.parties[int(c)] for c in clients]
        present = self._await(names)
        if self.secure_aggregation is not None:
            yield self._secure_fit(global_params, names, present, config)
            return
        tasks = {name: uuid.uuid4().hex for name in present}
        self._drain_stale()
        self.server.gate.open(config.round, tasks, TaskKind.SYNC if self.sync_mode else TaskKind.FIT)
        links = self.links(tasks)
        for name, task_id in tasks.items():
            if self.sync_mode:  # the party trains on its own schedule: it needs only the params
                task = Task(task_id=task_id, round=config.round, task=TaskKind.SYNC)
            else:
                local = dataclasses.replace(config, seed=client_seed(config, self.server.index[name]))
                task = Task(task_id=task_id, round=config.round, task=TaskKind.FIT, config=dataclasses.asdict(local))
            self._send(name, task)
            self.server.send_params(name, global_params, self.chunk_bytes)
        pending, accepted, lost = set(tasks), 0, 0
        for event in self._events(pending, config.round, links):
            if event.kind == EventKind.UPDATE:
                result = event.result
                # updates fold as they arrive, so a party's weight is capped by the others' latest known ones
                weight = self._capped(event.party, float(result.weight), self._last_weight)
                self._last_weight[event.party] = float(result.weight)
                try:
                    yield Update(
                        event.params,
                        weight,
                        self._shown(result.metrics),
                        client_id=self.server.index[event.party],
                        is_delta=result.is_delta,
                        stats=TrainStats.from_wire(result.stats),  # checked by the gate
                    )
                    accepted += 1
                finally:
                    self.server.release(event.params)
            elif event.kind == EventKind.GONE:
                lost += 1
        self.server.gate.close()
        self._record(len(tasks), len(names) - len(present), lost, len(pending))
        if pending:
            log.warning("round %d closed at the timeout without %s", config.round + 1, ", ".join(sorted(pending)))
        if accepted < self.min_parties:
            raise RoundIncomplete(
                f"round {config.round + 1}: {accepted} good update(s), fewer than min_parties={self.min_parties} "
                f"(rejected {self._metrics['rejected']:.0f}, lost {lost}, timed out {len(pending)})"
            )

    def _secure_fit(self, global_params: FlatParams, names: list[str], present: list[str], fit: FitConfig) -> Partial:
        from fedfleet.runtime.grpc.secure_runtime import SecureRound  # loads secagg only for secure sessions

        secure = SecureRound(self, self.secure_aggregation, present, fit, global_params.numel)
        partial = secure.run(global_params, fit)
        self._record(len(present), len(names) - len(present), secure.lost, len(secure.timed_out), secure.metrics())
        return partial

    def _record(self, parties: int, absent: int, lost: int, timed_out: int, extra: dict | None = None) -> None:
        """The round's counters, for ``round_metrics``."""
        self._metrics = {
            "parties": float(parties),
            "absent": float(absent),
            "lost": float(lost),
            "timed_out": float(timed_out),
            "rejected": float(sum(self.server.gate.rejected.values())),
            **({"dropped_metric_names": float(self._dropped_names)} if self._dropped_names else {}),
            **({"clamped_weights": float(self._clamped)} if self._clamped else {}),
            **{f"rejected_{kind}": float(n) for kind, n in self.server.gate.rejected.items()},
            **(extra or {}),
        }

    def _shown(self, metrics: dict[str, float]) -> dict[str, float]:
        """A party's metrics with names the session already shows, or new ones while fewer than
        ``MAX_METRIC_NAMES`` are known: parties inventing names every round cannot widen the table without end."""
        kept = {}
        for name, value in metrics.items():
            if name in self._metric_names or len(self._metric_names) < MAX_METRIC_NAMES:
                self._metric_names.add(name)
                kept[name] = value
            else:
                self._dropped_names += 1
        return kept

    def _capped(self, party: str, weight: float, weights: dict[str, float]) -> float:
        """``weight``, cut to ``max_weight_ratio`` times the median of the other parties' ``weights``: one party
        claiming a huge example count cannot take over the mean (counted as ``clamped_weights``)."""
        others = sorted(w for name, w in weights.items() if name != party)
        if self.max_weight_ratio is None or not others:
            return weight
        cap = self.max_weight_ratio * statistics.median(others)
        if weight <= cap:
            return weight
        self._clamped += 1
        log.warning("%s claims weight %g, cut to %g (network.max_weight_ratio=%g x the others' median)", party,
                    weight, cap, self.max_weight_ratio)  # fmt: skip
        return cap

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.evaluator is not None:
            trainer, data = self.evaluator
            metrics.update(trainer.evaluate(global_params, data))
        if self.federated_eval and not self.sync_mode:  # sync-mode parties evaluate on their own schedule
            metrics.update({f"party_{k}": v for k, v in self._federated_evaluate(global_params).items()})
        return metrics

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def finish(
        self, reason: str = "the session is complete", final_params: FlatParams | None = None, failed: bool = False
    ) -> None:
        """Tell every connected party the session is over (in sync mode, after sending it the final params);
        ``failed``: the parties raise ``reason`` rather than end normally."""
        if self.sync_mode and final_params is not None:
            for name in self.server.connected():
                self._send(name, Task(task_id=uuid.uuid4().hex, round=self._round + 1, task=TaskKind.FINAL))
                self.server.send_params(name, final_params, self.chunk_bytes)
        self.server.broadcast(Done(reason=reason, failed=failed))

    @property
    def sync_mode(self) -> bool:
        return self.server.mode == JoinMode.SYNC

    def initial_params(self) -> FlatParams:
        """For an arbiter without a model: the layout and initial params of the first party that answers.

        Every party then starts round 1 from these params, so all of them train the same model.
        """
        deadline = time.monotonic() + self.wait_timeout
        while time.monotonic() < deadline:
            with self.server.changed:
                while not self.server.connected() and time.monotonic() < deadline:
                    self.server.changed.wait(0.5)
            present = self.server.connected()
            if not present:
                break
            name, task_id = present[0], uuid.uuid4().hex
            self._drain_stale()
            self.server.gate.open(-1, {name: task_id}, TaskKind.INIT)
            links = self.links([name])
            self._send(name, Task(task_id=task_id, round=-1, task=TaskKind.INIT, has_params=False))
            for event in self._events({name}, -1, links):
                if event.kind == EventKind.UPDATE:
                    params = event.params.clone()
                    self.server.release(event.params)
                    self.server.gate.close()
                    log.info("initial params from %s (%s)", name, params.spec)
                    return params
            self.server.gate.close()
            log.warning("%s did not send its initial params; asking another party", name)
        raise PartiesMissingError(
            f"no party sent its initial params within {self.wait_timeout:.0f} s; are the parties started, "
            f"and do they dial port {self.server.port}?"
        )

    # -- internals ---------------------------------------------------------------------------------
    def _federated_evaluate(self, global_params: FlatParams) -> dict[str, float]:
        present = self.server.connected()
        if not present:
            return {}
        tasks = {name: uuid.uuid4().hex for name in present}
        self._drain_stale()
        self.server.gate.open(self._round, tasks, TaskKind.EVALUATE)
        links = self.links(tasks)
        for name, task_id in tasks.items():
            self._send(name, Task(task_id=task_id, round=self._round, task=TaskKind.EVALUATE))
            self.server.send_params(name, global_params, self.chunk_bytes)
        answers = {}
        for event in self._events(set(tasks), self._round, links):
            if event.kind == EventKind.EVALUATED:
                answers[event.party] = event.result
        self.server.gate.close()
        weights = {name: float(result.weight) for name, result in answers.items()}
        means = MetricMean()  # every answer is in: each weight is capped by the others' in this evaluation
        for name, result in answers.items():
            means.add(result.metrics, self._capped(name, weights[name], weights))
        return means.means()

    def _send(self, name: str, item: Any) -> None:
        link = self.server.link(name)
        if link is not None:
            link.outbox.send(item)

    def _events(self, pending: set[str], rnd: int, links: dict[str, PartyLink | None]) -> Iterator[Event]:
        """This round's events until every pending party is accounted for or the round times out; a party
        whose stream is no longer the one its task went to (``links``) is gone."""
        deadline = time.monotonic() + self.round_timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                event = self.server.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                for name in self.vanished(pending, links):
                    pending.discard(name)
                    yield Event(EventKind.GONE, name, rnd)
                continue
            if event.round != rnd and event.kind != EventKind.GONE:
                self.server.release(event.params)  # finished arriving after its round closed
                continue
            if event.party in pending:
                pending.discard(event.party)
                yield event
            else:
                self.server.release(event.params)

    def links(self, names: Iterable[str]) -> dict[str, PartyLink | None]:
        """Each party's stream now, before its task is sent on it."""
        return {name: self.server.link(name) for name in names}

    def vanished(self, names: set[str], links: dict[str, PartyLink | None]) -> list[str]:
        """The parties among ``names`` whose stream is not the one of ``links`` (it ended, or a reconnect
        replaced it): their task is lost. Their GONE event is not always queued for the round: one that left
        between the round's start and its tasks had it drained with the stale events, and a replaced stream
        queues none; a round waiting for them would wait out the round timeout (a day in sync mode)."""
        now = self.links(sorted(names))
        return [name for name, link in now.items() if link is None or link is not links.get(name)]

    def _drain_stale(self) -> None:
        while True:
            try:
                self.server.release(self.server.events.get_nowait().params)
            except queue.Empty:
                return

    def _await(self, names: list[str]) -> list[str]:
        """The selected parties that are connected, after waiting up to join_timeout for the others."""
        start = time.monotonic()
        need = min(self.min_parties, len(names))
        last_note = start
        told = ("", 0.0)  # the missing parties last told to the others, and when
        with self.server.changed:
            while True:
                # a refused party's stream may still be closing: it is not sent the round's task
                present = [n for n in names if self.server.link(n) is not None and n not in self.server.refused]
                coming = [n for n in names if n not in self.server.refused]  # a refused party does not return
                waited = time.monotonic() - start
                enough = len(present) >= need
                if (enough and len(present) >= len(coming)) or (waited >= self.join_timeout and enough):
                    return present
                if not enough and waited >= self.join_timeout and len(coming) < need:
                    # the others wait in vain for a party that was refused (unless it is fixed and restarted)
                    why = "; ".join(f"{n}: {self.server.refused[n]}" for n in names if n in self.server.refused)
                    raise PartiesMissingError(
                        f"round {self._round + 1} needs {need} parties and only {len(coming)} may take part: the "
                        f"arbiter refused {why}"
                    )
                if waited >= self.wait_timeout:
                    missing = sorted(set(names) - set(present))
                    how = "their training scripts" if self.sync_mode else "`fedfleet party <job.yaml> --name <party>`"
                    raise PartiesMissingError(
                        f"only {len(present)} of the {need} parties round {self._round + 1} needs connected in "
                        f"{self.wait_timeout:.0f} s; missing {', '.join(missing)}: start them with {how} (or lower "
                        f"min_parties)"
                    )
                if time.monotonic() - last_note >= 10:
                    missing = ", ".join(sorted(set(names) - set(present)))
                    log.warning("round %d waits for %s", self._round + 1, missing)
                    told = self._tell_waiting(missing, waited, told)
                    last_note = time.monotonic()
                self.server.changed.wait(0.5)

    def _tell_waiting(self, missing: str, waited: float, told: tuple[str, float]) -> tuple[str, float]:
        """Tell the connected parties whom the round waits for (when that changes, then once a minute): a party
        blocked in its sync would otherwise wait up to wait_timeout without a word."""
        if missing == told[0] and time.monotonic() - told[1] < 60:
            return told
        self.server.broadcast(
            Notice(
                text=f"round {self._round + 1} waits for {missing} (for {waited:.0f} s so far; the session gives up "
                f"after {self.wait_timeout:.0f} s)"
            )
        )
        return missing, time.monotonic()
