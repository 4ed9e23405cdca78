"""One secure round of the gRPC arbiter's server-driven rounds: SecAgg+ (``fedfleet.secagg``) over the streams.

The arbiter never sees a party's update, only the masked inputs, whose sum it unmasks:

    setup     -> every connected party of the round: its id (1-based position in the cohort), n, the settings
    adverts   <- two fresh public keys each, signed with its certificate        (within network.join_timeout)
    rosters   -> each party that advertised: who did, its neighbours' keys
    shares    <- its sealed Shamir shares, one per neighbour                     (within network.join_timeout)
    inboxes   -> each party that shared: the shares sealed for it; then the fit task and the global params
                 (party-paced: the sync task, which the party's own training loop answers at its next sync)
    masked    <- the update, clipped, weight-scaled, quantised and masked, as params chunks
                                                                                  (within network.round_timeout)
    unmask    -> each party whose masked input arrived: who of its neighbours is alive, who dropped
    replies   <- its shares of the alive ones' self-mask seeds, of the dropped ones' mask keys
                                                                                  (within network.join_timeout)

Each stage waits for the parties still in the round, never for one that is gone (its stream ended), failed
(it refused a step, e.g. an inbox that does not verify), was refused (a malformed or badly signed message), or
did not answer an earlier stage in time: that party dropped out at that stage, which SecAgg+ survives as long
as enough remain. The key stages take milliseconds for a live party, so ``join_timeout`` only bounds a hung
one. Below the threshold, or with fewer masked inputs than ``min_parties``, the round raises SecAggFailed (a
RoundIncomplete; nothing folded, the loop runs the round again with fresh keys and tasks), before any party is
asked to reveal a share when it can be foreseen.

The unmasked result is yielded as one ``Partial``: a weighted mean of the survivors that the strategy's own
weighted mean merges (its sum is sum_i w_i x_i with w_i = min(weight_i, max_weight), as the masks carried it),
with a report per survivor from its plaintext result header (weight, metrics, training stats).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedfleet.core.aggregate import WeightedMean
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import RoundIncomplete
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Partial, Report, TrainStats, Update
from fedfleet.runtime.grpc import secure_wire
from fedfleet.runtime.grpc.arbiter import Event, EventKind
from fedfleet.runtime.grpc.chunks import iter_chunks
from fedfleet.runtime.grpc.gate import MaskedRound, Rejection
from fedfleet.runtime.grpc.secure_arbiter import SharesFrom, SignedAdvert
from fedfleet.runtime.grpc.wire import Result, SecAggInbox, SecAggRoster, SecAggSetup, SecAggUnmask, Task, TaskKind
from fedfleet.runtime.sim.sequential import client_seed
from fedfleet.secagg.config import SecAggConfig
from fedfleet.secagg.errors import SecAggRefused
from fedfleet.secagg.in_process import graph_seed, mean_params
from fedfleet.secagg.messages import MaskedInput, UnmaskReply
from fedfleet.secagg.server import SecAggResult, SecAggServer

if TYPE_CHECKING:
    from fedfleet.runtime.grpc.runtime import GrpcRuntime

log = logging.getLogger("fedfleet.arbiter")

_OUT = (EventKind.GONE, EventKind.FAILURE, EventKind.REJECTED)  # a party that is out of the round for good


class SecureRound:
    """The stages of one secure round with the ``present`` parties (in the round's selection order)."""

    def __init__(
        self, runtime: GrpcRuntime, config: SecAggConfig, present: list[str], fit: FitConfig, numel: int
    ) -> None:
        self.rt, self.server, self.config, self.round = runtime, runtime.server, config, fit.round
        self.session = self.server.session
        self.ids = {name: i + 1 for i, name in enumerate(present)}  # Shamir x-coordinates start at 1
        self.names = {i: name for name, i in self.ids.items()}
        self.plan = config.validate(len(present))  # k and t for the connected parties: a ConfigError says which
        self.tasks = {name: uuid.uuid4().hex for name in present}
        # party-paced (sync mode): the parties' own training loops answer with their masked input at their sync
        self.kind = TaskKind.SYNC if runtime.sync_mode else TaskKind.FIT
        seed = graph_seed(fit.seed, fit.round)  # as the simulation's: a seeded deployment repeats it
        self.secagg = SecAggServer(self.session, self.round, config, sorted(self.names), seed, length=numel)
        self.out: set[str] = set()  # gone, failed, refused or silent: not waited for again this round
        self.lost = 0
        self.timed_out: set[str] = set()
        self.headers: dict[str, Result] = {}  # the plaintext headers of the masked inputs that were summed
        self.counts: dict[str, float] = {}

    def run(self, global_params: FlatParams, fit: FitConfig) -> Partial:
        spec = secure_wire.masked_spec(global_params.numel, self.plan.ring_bits)
        masked = MaskedRound(spec, self.session, dict(self.ids), len(self.ids), self.plan.degree)
        self.rt._drain_stale()
        self.server.gate.open(self.round, self.tasks, self.kind, masked)
        self.links = self.rt.links(self.tasks)
        try:
            return self._stages(global_params, fit)
        finally:
            self.server.gate.close()

    def _stages(self, global_params: FlatParams, fit: FitConfig) -> Partial:
        began = time.perf_counter()
        inboxes = self._keys()
        self._send_tasks(inboxes, global_params, fit)
        keys_done = time.perf_counter()
        masking = {self.names[p] for p in inboxes}
        self._collect(masking, self.rt.round_timeout, None, "masked", self._masked_input)
        self.server.gate.close()  # masked inputs after this are late
        masked_done = time.perf_counter()
        partial = self._unmask(global_params)
        # the protocol's own wall time at the arbiter: the key stages before the fit tasks, the unmasking after
        self.counts.update(keys_s=keys_done - began, unmask_s=time.perf_counter() - masked_done)
        log.info("secure round %d: %s", self.round + 1, ", ".join(f"{k} {v:.4g}" for k, v in self.counts.items()))
        return partial

    def _keys(self) -> dict[int, list]:
        """Setup, adverts, rosters and shares: each party's inbox of sealed shares."""
        sa, join_s = self.secagg, self.rt.join_timeout
        values = secure_wire.config_values(self.config)
        for name in self.ids:
            setup = SecAggSetup(**self._header(name), n=len(self.ids), config=values, graph_seed=sa.graph_seed)
            self._send(name, setup)
        adverts: dict[int, SignedAdvert] = {}
        self._collect(set(self.ids), join_s, SignedAdvert, "advertised", lambda name, a: self._advert(name, a, adverts))
        signed = {party: a.signed for party, a in adverts.items()}
        rosters = sa.rosters()  # SecAggFailed: too few advertised
        for party, roster in rosters.items():
            payload = secure_wire.encode_roster(roster, signed)
            self._send(self.names[party], SecAggRoster(**self._header(self.names[party]), payload=payload))
        shared = {self.names[p] for p in rosters}
        self._collect(shared, join_s, SharesFrom, "shared", lambda name, s: sa.receive_shares(s.party, s.shares))
        return sa.inboxes()  # SecAggFailed: some party's shares reached too few share holders

    def _send_tasks(self, inboxes: dict[int, list], global_params: FlatParams, fit: FitConfig) -> None:
        """Each party that shared: its inbox, then the fit task and the global params, as a plain round's."""
        for party, inbox in inboxes.items():
            name = self.names[party]
            body = secure_wire.encode_shares(inbox, by_sender=True)
            self._send(name, SecAggInbox(**self._header(name), payload=body))
            if self.kind == TaskKind.SYNC:  # the party trains on its own schedule: it needs only the params
                task = Task(task_id=self.tasks[name], round=self.round, task=TaskKind.SYNC)
            else:
                local = dataclasses.replace(fit, seed=client_seed(fit, self.server.index[name]))
                config = dataclasses.asdict(local)
                task = Task(task_id=self.tasks[name], round=self.round, task=TaskKind.FIT, config=config)
            self._send(name, task)
            self._send(name, iter_chunks(global_params, self.rt.chunk_bytes))

    def _unmask(self, global_params: FlatParams) -> Partial:
        """Unmask requests and replies, then the unmasked sum as the round's Partial."""
        sa, rt = self.secagg, self.rt
        if len(self.headers) < rt.min_parties:
            raise RoundIncomplete(
                f"secure round {self.round + 1}: {len(self.headers)} masked input(s), fewer than "
                f"min_parties={rt.min_parties} (lost {self.lost}, timed out {len(self.timed_out)})"
            )
        requests = sa.unmask_requests()  # SecAggFailed: too few alive to unmask
        for party, request in requests.items():
            name = self.names[party]
            self._send(name, SecAggUnmask(**self._header(name), payload=secure_wire.encode_request(request)))
        asked = {self.names[p] for p in requests}
        self._collect(asked, rt.join_timeout, UnmaskReply, "unmasked", lambda name, r: sa.receive_unmask_reply(r))
        result = sa.result()  # SecAggFailed: too few shares came back
        self.counts["mean_bound"] = result.mean_bound()
        return self._partial(result, global_params)

    def _advert(self, name: str, advert: SignedAdvert, adverts: dict[int, SignedAdvert]) -> None:
        self.secagg.receive_advert(advert.advert)
        adverts[advert.advert.party] = advert

    def _masked_input(self, name: str, event: Event) -> None:
        data = secure_wire.ring_vector(event.params)
        self.secagg.receive_masked_input(MaskedInput(self.session, self.round, self.ids[name], data))
        self.headers[name] = event.result

    def _collect(self, pending: set[str], seconds: float, expect: type | None, count: str,
                 take: Callable[[str, Any], None]) -> None:  # fmt: skip
        """One stage: ``take`` each pending party's answer (a STAGE event's message of type ``expect``, or with
        ``expect`` None a masked input's UPDATE event) until every one answered or is out, or ``seconds`` pass."""
        events = self.server.events
        pending = pending - self.out
        answered: set[str] = set()
        deadline = time.monotonic() + seconds
        while pending and (left := deadline - time.monotonic()) > 0:
            try:
                event = events.get(timeout=min(left, 1.0))
            except queue.Empty:
                for name in self.rt.vanished(pending, self.links):  # it left, and its GONE event was drained as stale
                    self.lost += 1
                    self.out.add(name)
                    pending.discard(name)
                continue
            try:
                if event.party not in self.ids or (event.round != self.round and event.kind != EventKind.GONE):
                    continue  # another round's (it finished arriving late), or a party outside this round
                if event.kind in _OUT:
                    self.lost += event.kind == EventKind.GONE
                    self.out.add(event.party)
                    pending.discard(event.party)
                    continue
                got = event.stage if expect is not None else event
                wanted = EventKind.STAGE if expect is not None else EventKind.UPDATE
                if event.kind != wanted or (expect is not None and not isinstance(got, expect)):
                    self._refuse(event.party, Rejection.SECAGG, "a message out of turn")
                elif event.party in answered:
                    self._refuse(event.party, Rejection.DUPLICATE, "a second answer to one stage")
                elif event.party not in pending:
                    self._refuse(event.party, Rejection.LATE, "an answer after its party dropped out")
                else:
                    pending.discard(event.party)
                    try:
                        take(event.party, got)
                        answered.add(event.party)
                    except SecAggRefused as exc:
                        self.out.add(event.party)
                        self._refuse(event.party, Rejection.SECAGG, str(exc))
            finally:
                self.server.release(event.params)
        self.timed_out |= pending
        self.out |= pending  # silent at its stage: it dropped out there
        self.counts[count] = float(len(answered))

    def _refuse(self, name: str, kind: Rejection, reason: str) -> None:
        self.server.gate.reject(kind)
        self.server._warn(name, "secure round %d refused %s's message: %s", self.round + 1, name, reason)

    def _partial(self, result: SecAggResult, global_params: FlatParams) -> Partial:
        """The unmasked weighted sum as the strategy's own weighted mean of the survivors: each survivor carries
        the mean with its share of the unmasked weight, so the sum, the weight and the count are the round's
        (folded with one multiply-add for all of them)."""
        mean = mean_params(result, global_params)
        survivors = [self.names[i] for i in sorted(result.survivors)]
        capped = {name: min(float(self.headers[name].weight), self.config.max_weight) for name in survivors}
        scale = result.weight / sum(capped.values())
        updates = []
        for name in survivors:
            header = self.headers[name]
            stats = TrainStats.from_wire(header.stats)  # checked by the gate
            updates.append(Update(mean, capped[name] * scale, self.rt._shown(header.metrics), self.server.index[name],
                                  stats=stats))  # fmt: skip
        folded = WeightedMean(global_params)
        folded.add_same(mean, updates)
        reports = [Report(u.client_id, u.weight, u.metrics, u.stats) for u in updates]
        return Partial(folded, reports)

    def metrics(self) -> dict[str, float]:
        return {f"secagg_{key}": value for key, value in self.counts.items()}

    def _header(self, name: str) -> dict[str, Any]:
        return {"task_id": self.tasks[name], "round": self.round, "session": self.session, "party": self.ids[name]}

    def _send(self, name: str, item: Any) -> None:
        if name not in self.out:
            self.rt._send(name, item)
