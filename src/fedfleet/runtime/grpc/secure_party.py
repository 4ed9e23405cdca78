"""A data owner's side of secure rounds over gRPC: a fresh ``secagg.SecAggParty`` per round, fed by the arbiter.

    setup   -> check the settings against this party's own job, draw fresh keys, send the signed advert
    roster  -> check the neighbours' signatures against the job's CA, send the sealed shares
    inbox   -> keep the shares sealed for this party until the fit task's update is ready; from the second
               round on, sum the masks meanwhile in a thread of their own (for as many values as the last
               round's update had), so that the update, once trained, is only quantised into them
    fit     -> (``Party``) train, then mask the update delta and send it as the masked params (party-paced: the
               sync task, answered by ``SyncParty.sync`` at the training loop's next sync point)
    unmask  -> reveal the one kind of share per neighbour the request allows, or refuse

What the arbiter cannot check under the masks, the party checks before masking: ``masked_input`` refuses NaN
and inf, clips every value to [-clip, clip] and caps the weight. A party whose job has ``secure_aggregation``
never sends a plain update: a fit task without a secure round set up for it is refused. Any step it refuses
(settings other than its job's, a forged roster, an inbox that does not verify, an unmask request that would
reveal both kinds of share of one peer) is answered with a ``Failure``, and the round goes on without it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import secure_wire
from fedfleet.runtime.grpc.chunks import dtype_name
from fedfleet.runtime.grpc.links import Outbox
from fedfleet.runtime.grpc.secure_identity import Signer, Verifier
from fedfleet.runtime.grpc.secure_wire import Signed
from fedfleet.runtime.grpc.wire import (
    Failure,
    Result,
    SecAggAdvert,
    SecAggInbox,
    SecAggMessage,
    SecAggReply,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    Task,
    WireError,
)
from fedfleet.secagg.config import Plan, SecAggConfig
from fedfleet.secagg.errors import SecAggRefused
from fedfleet.secagg.in_process import flatten
from fedfleet.secagg.messages import EncryptedShare, Roster
from fedfleet.secagg.party import SecAggParty

log = logging.getLogger("fedfleet.party")


@dataclass
class _Round:
    """The secure round this party is in: what the arbiter set up, and the protocol's state for it."""

    task_id: str
    round: int
    party: int  # this party's id in the round
    n: int
    graph_seed: int
    plan: Plan
    protocol: SecAggParty
    inbox: list[EncryptedShare] | None = None
    preparing: threading.Thread | None = None  # summing the masks ahead of the update
    refused: SecAggRefused | None = None  # why the inbox was refused there


class SecureStages:
    """``config``: this party's job's settings (the arbiter's must equal them); ``seed``: the job's seed, which
    drives only the quantiser's stochastic rounding (as in the simulation); ``signer`` / ``verifier``: this
    party's certificate and the job's CA (None on ``--insecure``); ``parties``: the job's party names."""

    prepare_masks = True  # sum the masks before the update is there (benchmarks/secagg_grpc.py measures both)

    def __init__(
        self,
        config: SecAggConfig,
        session: str,
        name: str,
        parties: list[str],
        seed: int = 0,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.config, self.session, self.name, self.parties, self.seed = config, session, name, parties, seed
        self.signer, self.verifier = signer, verifier
        self.current: _Round | None = None
        self._last: tuple[np.ndarray, weakref.ref] | None = None  # the last masked input, and whether it is read
        self._spare_lock = threading.Lock()  # a spare buffer goes to one round only
        self._length: int | None = None  # the last masked update's number of values
        # the arbiter's stage messages and their handlers (a table, not a chain of type tests)
        self._handlers: dict[type, Callable[[Any, Outbox], None]] = {
            SecAggSetup: self._setup,
            SecAggRoster: self._roster,
            SecAggInbox: self._inbox,
            SecAggUnmask: self._unmask,
        }

    def handle(self, msg: object, outbox: Outbox) -> bool:
        """Answer a stage message (True), or say it is none (False)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            return False
        assert isinstance(msg, SecAggMessage)
        try:
            handler(msg, outbox)
        except (SecAggRefused, WireError, ConfigError, ValueError) as exc:
            log.warning("%s: secure round %s: refused the arbiter's %s: %s", self.name, msg.round, msg.kind, exc)
            outbox.send(Failure(task_id=str(msg.task_id), round=-1 if self._odd(msg.round) else msg.round,
                                reason=f"secure aggregation: {exc}"))  # fmt: skip
        return True

    def _spare(self, size: int, r: _Round) -> np.ndarray | None:
        """The last masked input's buffer once nothing can read it any more (its upload's chunks are gone), for
        this one: a fresh model-sized buffer every round pays its page faults (masked_input 1.07-1.10x slower
        into a new buffer, benchmarks/secagg.py)."""
        with self._spare_lock:
            if self._last is None:
                return None
            data, read = self._last
            if read() is not None or data.shape != (size,) or data.dtype != r.plan.dtype:
                return None
            self._last = None
            return data

    def ready(self, task: Task) -> bool:
        """Whether ``task`` is the fit task of the secure round set up, with its inbox in."""
        r = self.current
        return r is not None and r.task_id == task.task_id and r.round == task.round and r.inbox is not None

    def mask(self, task: Task, update: Update) -> tuple[Result, FlatParams]:
        """The masked input of ``update`` (its delta's float buffers, flattened) for ``task``'s secure round."""
        r = self.current
        if r is None or not self.ready(task):
            raise SecAggRefused("no secure round is set up for this fit task: this party sends no plain update")
        if not update.is_delta:
            raise SecAggRefused("secure aggregation sums update deltas; this trainer sent full params")
        values = flatten(update.params)
        if r.preparing is not None:
            r.preparing.join()
        if r.refused is not None:
            raise r.refused
        self._length = values.size
        out = None if r.protocol.prepared(values.size) else self._spare(values.size + 1, r)
        masked = r.protocol.masked_input(values, float(update.weight), r.inbox, out=out)
        params, read = secure_wire.lend(masked.data)
        self._last = (masked.data, read)
        header = Result(
            task_id=task.task_id,
            round=task.round,
            task=task.task,  # fit, or a party-paced sync
            weight=float(update.weight),
            metrics={k: float(v) for k, v in update.metrics.items()},
            stats=update.stats.to_wire(),
            has_params=True,
            is_delta=True,
            spec_digest=params.spec.digest,
            sizes={dtype_name(d): b.numel() for d, b in params.buffers.items()},
            session=self.session,
            secagg_party=r.party,
        )
        return header, params

    # -- the stages --------------------------------------------------------------------------------------
    def _setup(self, msg: SecAggSetup, outbox: Outbox) -> None:
        self.current = None  # a new round (or a retry of one) forgets the last: its secrets are spent
        mine = secure_wire.config_values(self.config)
        if msg.session != self.session:
            raise SecAggRefused(f"a secure round for session {str(msg.session)[:80]!r}, not {self.session!r}")
        if msg.config != mine:
            raise SecAggRefused(
                f"the arbiter asks for secure aggregation {str(msg.config)[:300]}, this job's is {mine}"
            )
        n, party = msg.n, msg.party
        if not (_int(n) and 2 <= n <= len(self.parties) and _int(party) and 1 <= party <= n and _int(msg.round)):
            raise SecAggRefused(f"a setup for party {party!r} of {n!r} in round {msg.round!r} (the job has "
                                f"{len(self.parties)} parties)")  # fmt: skip
        if not (_int(msg.graph_seed) and msg.graph_seed >= 0):
            raise SecAggRefused(f"a graph seed of {msg.graph_seed!r}")
        plan = self.config.validate(n)
        protocol = SecAggParty(party, self.session, msg.round, self.config, plan, seed=(self.seed, msg.round, party))
        self.current = _Round(str(msg.task_id), msg.round, party, n, msg.graph_seed, plan, protocol)
        advert = protocol.advertise()
        signed = Signed()
        if self.signer is not None:
            signed = self.signer.sign(self.session, msg.round, party, advert.cipher_pk, advert.mask_pk)
        outbox.send(SecAggAdvert(**self._header(), cipher_pk=advert.cipher_pk.hex(), mask_pk=advert.mask_pk.hex(),
                                 payload=secure_wire.encode_signed(signed)))  # fmt: skip

    def _roster(self, msg: SecAggRoster, outbox: Outbox) -> None:
        r = self._round_of(msg)
        roster, signed = secure_wire.decode_roster(
            msg.payload, self.session, r.round, r.party, r.graph_seed, r.n, r.plan.degree
        )
        self._check_signatures(r, roster, signed)
        shares = r.protocol.share_keys(roster)
        outbox.send(SecAggShares(**self._header(), payload=secure_wire.encode_shares(shares)))

    def _inbox(self, msg: SecAggInbox, outbox: Outbox) -> None:
        r = self._round_of(msg)
        if r.inbox is not None:  # its masks may be in the making: one inbox per round, as the arbiter sends
            raise SecAggRefused("a second inbox for this round")
        r.inbox = secure_wire.decode_inbox(msg.payload, self.session, r.round, r.party, r.n, r.plan.degree)
        if self.prepare_masks and self._length is not None:
            r.preparing = threading.Thread(target=self._prepare, args=(r, self._length), daemon=True,
                                           name=f"{self.name}-masks-round-{r.round + 1}")  # fmt: skip
            r.preparing.start()

    def _prepare(self, r: _Round, length: int) -> None:
        """The round's masks for ``length`` values, while the fit task trains (in a thread of its own)."""
        assert r.inbox is not None
        try:
            r.protocol.prepare_masks(r.inbox, length, out=self._spare(length + 1, r))
        except SecAggRefused as exc:  # the inbox does not verify: the party withdraws, as masked_input would
            r.refused = exc
        except Exception:  # e.g. out of memory: masked_input makes the masks itself
            log.warning("%s: secure round %d: the masks could not be made ahead", self.name, r.round + 1, exc_info=True)

    def _unmask(self, msg: SecAggUnmask, outbox: Outbox) -> None:
        r = self._round_of(msg)
        request = secure_wire.decode_request(msg.payload, self.session, r.round, r.party, r.n, r.plan.degree)
        reply = r.protocol.unmask(request)  # SecAggRefused: nothing revealed
        outbox.send(SecAggReply(**self._header(), payload=secure_wire.encode_reply(reply)))

    # -- internals -----------------------------------------------------------------------------------------
    def _check_signatures(self, r: _Round, roster: Roster, signed: dict[int, Signed]) -> None:
        """Each neighbour's keys signed with a distinct certificate of another party of the job, from its CA."""
        if self.verifier is None:
            return
        names: dict[str, int] = {}
        for j in sorted(roster.cipher_pks):
            name, problem = self.verifier.check(
                signed[j], self.session, r.round, j, roster.cipher_pks[j], roster.mask_pks[j]
            )
            if not problem and (name == self.name or name in names):
                problem = f"{name}'s certificate signs the keys of party {j} and of party {names.get(name, r.party)}"
            if problem:
                raise SecAggRefused(f"the roster's keys of party {j} are not bound to a party: {problem}")
            names[name] = j

    def _round_of(self, msg: SecAggMessage) -> _Round:
        r = self.current
        if r is None or (msg.task_id, msg.round, msg.session, msg.party) != (r.task_id, r.round, self.session, r.party):
            raise SecAggRefused(f"a {msg.kind} for another round than the secure round this party set up")
        return r

    def _header(self) -> dict[str, Any]:
        r = self.current
        assert r is not None
        return {"task_id": r.task_id, "round": r.round, "session": self.session, "party": r.party}

    @staticmethod
    def _odd(value: object) -> bool:
        return not _int(value)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
