"""The checks a party's join passes before the arbiter welcomes it (a mixin of ``ArbiterServer``).

A join is refused, with a reason the party shows and does not retry, when it does not decode, speaks another
protocol, names another party than its certificate, asks for another session, mode or number of syncs, has
another param layout or token ids, or has other secure-aggregation settings than the arbiter's job.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING

from fedfleet.core.params import ParamSpec, spec_difference
from fedfleet.core.vocab import SessionVocabulary
from fedfleet.runtime.grpc.chunks import spec_from_description
from fedfleet.runtime.grpc.secure_wire import config_values
from fedfleet.runtime.grpc.wire import PROTOCOL, Garbled, Join, JoinMode, Message, WireError

if TYPE_CHECKING:
    from fedfleet.secagg.config import SecAggConfig

log = logging.getLogger("fedfleet.arbiter")

MAX_ROUNDS = 10**7  # syncs a party may announce
MAX_LAYOUT_BYTES = 16 << 20  # a model-less arbiter reads at most this much of a join's layout (100k+ tensors)


class JoinChecks:
    """What ``ArbiterServer`` knows of its session, as the join checks read it."""

    session: str
    parties: list[str]
    index: dict[str, int]
    secure: bool  # mutual TLS: the identity is the certificate's
    mode: JoinMode
    rounds: int | None
    vocabulary: SessionVocabulary
    changed: threading.Condition
    spec: ParamSpec | None
    _layout_bytes: int
    secure_aggregation: SecAggConfig | None = None  # the job's: every party's job must say the same
    # a party-paced session that takes secure aggregation from its parties: until ``settle_secure`` decides, a
    # party may join plain or with ``secure_aggregation``'s settings, and ``secure_wanted`` records which
    secure_undecided: bool = False
    secure_wanted: dict[str, bool]

    def _adopt(self, spec: ParamSpec) -> None:
        raise NotImplementedError

    def _refuse_identity(self, certified: str | None) -> str:
        if certified is None:
            return "no client certificate"
        if certified not in self.index:
            return f"{certified!r} is not a party of session {self.session!r} (parties: {', '.join(self.parties)})"
        return ""

    def _identify(self, join: Message | Garbled, certified: str | None) -> tuple[str, str]:
        if isinstance(join, Garbled):
            return "", f"the first message does not decode ({join.reason})"
        if not isinstance(join, Join):
            return "", f"the first message must be a join, got {join.kind}"
        if not (isinstance(join.rounds, int) and 0 <= join.rounds <= MAX_ROUNDS):
            return "", f"a join must announce 0 to {MAX_ROUNDS} syncs, got {join.rounds!r}"
        if join.protocol != PROTOCOL:
            return "", f"protocol {join.protocol} is not this arbiter's {PROTOCOL}; use the same fedfleet version"
        if self.secure:
            if join.name and join.name != certified:
                return "", f"the certificate is for {certified!r} but the party says it is {join.name!r}"
            name = certified
        else:
            name = join.name
        if name not in self.index:
            return "", f"{name!r} is not a party of session {self.session!r} (parties: {', '.join(self.parties)})"
        if join.session != self.session:
            return "", f"{name} asked for session {join.session!r}; this arbiter runs session {self.session!r}"
        if join.mode != self.mode:
            mode = JoinMode(self.mode).value
            return "", f"{name} joined in {join.mode} mode; this arbiter runs the session in {mode} mode"
        if self.rounds and join.rounds and join.rounds != self.rounds:
            return "", (
                f"{name} plans {join.rounds} syncs but the session has {self.rounds} rounds; give every party the "
                f"same training length and aggregation frequency"
            )
        return name, (
            self._check_layout(name, join) or self.vocabulary.check(name, join.vocab) or self._check_secure(name, join)
        )

    def _check_layout(self, name: str, join: Join) -> str:
        with self.changed:
            known = self.spec
        if known is not None and join.spec_digest == known.digest:
            return ""  # the common case reads nothing of the layout it sent
        # a layout is read only to learn it (a model-less arbiter) or to explain a mismatch, and only up to a
        # size: parsing JSON costs many times its bytes in Python objects
        most = MAX_LAYOUT_BYTES if known is None else 2 * self._layout_bytes + (64 << 10)
        theirs = None
        if join.payload.nbytes > most:
            if known is None:
                return f"{name}'s param layout is {join.payload.nbytes} bytes; at most {most} are read"
        elif join.payload.nbytes:
            try:
                theirs = spec_from_description(json.loads(bytes(join.payload)))
            except (ValueError, WireError) as exc:
                return f"{name} sent an unreadable param layout: {exc}"
            if theirs.digest != join.spec_digest:
                return f"{name}'s layout does not match its own digest"
        with self.changed:
            if self.spec is None:
                if theirs is None:
                    return f"{name} did not send its param layout, and this arbiter has no model to take it from"
                self._adopt(theirs)
                log.info("param layout from %s: %s", name, theirs)
        if join.spec_digest == self.spec.digest:
            return ""
        detail = f": {spec_difference(self.spec, theirs)}" if theirs is not None else ""
        return f"{name}'s model has another param layout than the session's (is it the same architecture?){detail}"

    def _check_secure(self, name: str, join: Join) -> str:
        """A party must mask (or not) as the arbiter unmasks, with the same settings: else its masked input would
        not add up, or a party that wants its update hidden would be asked for it in plain."""
        theirs = join.secure_aggregation
        with self.changed:
            mine = config_values(self.secure_aggregation)
            if self.secure_undecided and theirs in (None, mine):
                self.secure_wanted[name] = theirs is not None
                return ""
        if theirs == mine:
            return ""
        if self.mode == JoinMode.SYNC:
            return _sync_secure_problem(name, mine, theirs)
        if mine is None:
            return f"{name}'s job has a secure_aggregation section and this arbiter's does not: give both the same"
        if join.secure_aggregation is None:
            return f"this arbiter's job has secure_aggregation {mine} and {name}'s does not: give both the same"
        theirs = str(join.secure_aggregation)[:300]
        return f"{name}'s job has secure_aggregation {theirs}, this arbiter's {mine}: give both the same"


def _sync_secure_problem(name: str, mine: dict | None, theirs: object) -> str:
    """Why a party-paced party's aggregator is not the session's, in the words its FedArguments use."""
    fix = "give every party the same FedArguments(aggregator=...)"
    if mine is None:
        return f"{name} asks for aggregator='secure' and this session aggregates in plain: {fix} (and the arbiter)"
    if theirs is None:
        return f"{name} syncs with aggregator='plain' and this session is secure ({mine}): {fix}"
    return f"{name} asks for secure aggregation {str(theirs)[:300]}, this session's is {mine}: give both the same"
