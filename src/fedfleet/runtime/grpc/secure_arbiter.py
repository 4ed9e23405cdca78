"""The arbiter's server for sessions with secure aggregation: it reads the stage messages of secure rounds.

Each stage message (advert, shares, unmask reply) is checked on the reader thread of the stream it came on,
before the round's driver (``secure_runtime.py``) sees it: it is attributed to the party of that stream (its
certificate), never to the id it claims; its round, task, session and claimed id must be the ones the arbiter
gave that party (``RoundGate.admit_stage``: refused and counted otherwise, e.g. ``rejected_identity``); its body
must decode within the bound the round allows (``secure_wire``: refused before parsing when too long); and an
advert must be signed with the party's own certificate (``secure_identity``, on a session with mutual TLS).
A malformed or badly signed message is a final refusal (``rejected_secagg``): the party is out of the round,
which goes on without it. What passes becomes an ``EventKind.STAGE`` event carrying the ``secagg`` message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import secure_wire
from fedfleet.runtime.grpc.arbiter import ArbiterServer, Event, EventKind, _Receiving
from fedfleet.runtime.grpc.gate import MaskedRound, Refusal, Rejection
from fedfleet.runtime.grpc.links import PartyLink
from fedfleet.runtime.grpc.secure_identity import Verifier
from fedfleet.runtime.grpc.secure_wire import Signed
from fedfleet.runtime.grpc.wire import Message, SecAggAdvert, SecAggMessage, SecAggReply, SecAggShares, WireError
from fedfleet.secagg.config import SecAggConfig
from fedfleet.secagg.crypto import KEY_BYTES
from fedfleet.secagg.messages import Advertise, EncryptedShare

log = logging.getLogger("fedfleet.arbiter")


@dataclass(frozen=True)
class SignedAdvert:
    """An advert that passed the wire's checks, with what binds it to its party's certificate."""

    advert: Advertise
    signed: Signed


@dataclass(frozen=True)
class SharesFrom:
    """A party's sealed shares, attributed to the id its stream's party was given."""

    party: int
    shares: list[EncryptedShare]


class SecureArbiterServer(ArbiterServer):
    """An ``ArbiterServer`` whose rounds may be secure: ``secure_aggregation`` is the job's settings, every
    party's job must have the same (checked at join); ``verifier`` (None on ``--insecure``) checks adverts."""

    def __init__(
        self,
        *,
        secure_aggregation: SecAggConfig | None,
        verifier: Verifier | None = None,
        parties_decide: bool = False,
        **kwargs: Any,
    ) -> None:
        """``parties_decide`` (party-paced sessions): the parties say whether the session is secure, each joining
        plain or with ``secure_aggregation``'s settings, until ``settle_secure`` decides from what they said."""
        super().__init__(**kwargs)
        self.secure_aggregation = secure_aggregation
        self.verifier = verifier
        self.secure_undecided = parties_decide and secure_aggregation is not None
        self.secure_wanted: dict[str, bool] = {}  # while undecided: whether each party that joined asked for it
        # the stage messages a party may send, and what each becomes (a table, not a chain of type tests)
        self._stage_readers: dict[type, Callable[[PartyLink, Any, MaskedRound], Any]] = {
            SecAggAdvert: self._advert,
            SecAggShares: self._shares,
            SecAggReply: self._reply,
        }

    def settle_secure(self) -> SecAggConfig | None:
        """Decide from the parties that joined (refused ones aside) whether the session is secure: when all asked
        for it, with the offered settings; when none did, plain. Parties that join later must say the same. A
        mix is a ConfigError naming who asked for which: no party that asked for masking is asked for a plain
        update, and none is masked against its own job's word."""
        with self.changed:
            if not self.secure_undecided:
                return self.secure_aggregation
            self.secure_undecided = False
            wanted = {name: w for name, w in self.secure_wanted.items() if name not in self.refused}
            secure = [name for name in self.parties if wanted.get(name)]
            plain = [name for name in self.parties if name in wanted and not wanted[name]]
            if not secure:
                self.secure_aggregation = None
            elif plain:
                raise ConfigError(
                    f"the parties disagree on the aggregator: {', '.join(secure)} ask for aggregator='secure' and "
                    f"{', '.join(plain)} for 'plain'; give every party the same FedArguments(aggregator=...)"
                )
            return self.secure_aggregation

    def _on_other(self, link: PartyLink, msg: Message, state: _Receiving) -> bool:
        read = self._stage_readers.get(type(msg))
        if read is None:
            return False
        assert isinstance(msg, SecAggMessage)
        refusal = self.gate.admit_stage(link.name, msg)  # counted there when refused
        masked = self.gate.masked_round
        if refusal is None and masked is not None:
            try:
                stage = read(link, msg, masked)
            except WireError as exc:
                refusal = Refusal(Rejection.SECAGG, f"{msg.kind}: {exc}")
                self.gate.reject(refusal.kind)
            else:
                self.events.put(Event(EventKind.STAGE, link.name, msg.round, stage=stage))
                return True
        state.bad += 1
        self._warn(link.name, "refused %s's %s: %s", link.name, msg.kind, refusal)
        if refusal is not None and refusal.kind.final:  # its answer for this stage is bad: do not wait for it
            self.events.put(Event(EventKind.REJECTED, link.name, msg.round, reason=str(refusal)))
        return True

    def _advert(self, link: PartyLink, msg: SecAggAdvert, masked: MaskedRound) -> SignedAdvert:
        party = masked.ids[link.name]
        keys = [_key(msg.cipher_pk, "cipher_pk"), _key(msg.mask_pk, "mask_pk")]
        signed = secure_wire.decode_signed(msg.payload)
        if self.verifier is not None:
            name, problem = self.verifier.check(signed, masked.session, msg.round, party, *keys)
            if not problem and name != link.name:
                problem = f"the advert is signed with {name}'s certificate"
            if problem:
                raise WireError(problem)
        return SignedAdvert(Advertise(masked.session, msg.round, party, *keys), signed)

    def _shares(self, link: PartyLink, msg: SecAggShares, masked: MaskedRound) -> SharesFrom:
        party = masked.ids[link.name]
        shares = secure_wire.decode_shares(msg.payload, masked.session, msg.round, party, masked.n, masked.degree)
        return SharesFrom(party, shares)

    def _reply(self, link: PartyLink, msg: SecAggReply, masked: MaskedRound) -> Any:
        party = masked.ids[link.name]
        return secure_wire.decode_reply(msg.payload, masked.session, msg.round, party, masked.n, masked.degree)


def _key(text: object, what: str) -> bytes:
    """A raw X25519 public key from its hex form in a header."""
    if not isinstance(text, str) or len(text) != 2 * KEY_BYTES:
        raise WireError(f"{what} must be {2 * KEY_BYTES} hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise WireError(f"{what} is not hex") from None
