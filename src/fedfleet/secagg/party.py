"""One party's side of one SecAgg+ round: a state machine a runtime drives, stage by stage.

advertise -> share_keys(roster) -> [prepare_masks(inbox, length)] -> masked_input(values, weight, inbox)
          -> unmask(request) [-> unmask(...) again]

The masks depend on the keys and the inbox only, so ``prepare_masks`` can sum them while the update is still
being trained (or downloaded); ``masked_input`` then quantises the update into that sum, one add per element.

The object lives for one round and draws fresh keys when it is made: two X25519 key pairs (share encryption,
pairwise masks) and a 32-byte self-mask seed, all from the OS's cryptographic source. The optional ``seed``
drives only the stochastic rounding of the quantiser, so a seeded federation repeats bit for bit (the masks
cancel exactly whatever the keys). Whatever the server asks, an honest party:
- never reveals both a peer's self-mask share and its mask-key share, even across repeated requests;
- answers only for its own neighbours, only when it is itself alive, and only when at least ``threshold`` of its
  neighbourhood (itself included: with k = n - 1 this is Bonawitz et al.'s |U3| >= t) is said to be alive;
- refuses a whole inbox when one share in it is for another session, round or receiver, comes from a
  non-neighbour or twice, or fails its tag: the party then withdraws (raises SecAggRefused and sends no masked
  input), which the round survives as a dropout after shares. Dropping only the bad share would leave the
  sender's pairwise mask with this party in the sum, unbalanced, and corrupt the result without a trace.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from fedfleet.secagg import crypto, graph, shamir
from fedfleet.secagg.config import Plan, SecAggConfig
from fedfleet.secagg.errors import SecAggRefused
from fedfleet.secagg.masks import add_masks
from fedfleet.secagg.messages import Advertise, EncryptedShare, MaskedInput, Roster, UnmaskReply, UnmaskRequest
from fedfleet.secagg.quantize import quantize, quantize_weight

_SELF, _KEY = "self-mask", "mask-key"


def check_party_id(party: object) -> int:
    """Party ids are Shamir x-coordinates: ints >= 1."""
    if isinstance(party, bool) or not isinstance(party, int) or party < 1:
        raise ValueError(f"a secure-aggregation party id must be an int >= 1, got {party!r}")
    return party


class SecAggParty:
    def __init__(
        self,
        party: int,
        session: str,
        round: int,
        config: SecAggConfig,
        plan: Plan,
        *,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        self.party = check_party_id(party)
        self.session, self.round, self.config, self.plan = session, round, config, plan
        self._rng = np.random.default_rng(seed)  # stochastic rounding only, never a key
        self._cipher_sk = crypto.generate()
        self._mask_sk = crypto.generate()
        self._self_seed = secrets.token_bytes(shamir.SECRET_BYTES)
        self._stage = "new"
        self.neighbours: frozenset[int] = frozenset()
        self.threshold = 0
        self._cipher_secrets: dict[int, bytes] = {}  # neighbour -> X25519(cipher keys), for both directions
        self._mask_pks: dict[int, bytes] = {}
        self._held: dict[int, tuple[int, int]] = {}  # sender -> its (self-seed share, mask-key share) for me
        self._revealed: dict[int, str] = {}  # peer -> the one kind of share this party has revealed for it
        self._prepared: tuple[list[EncryptedShare], np.ndarray] | None = None  # the inbox, and its masks' sum

    # stage 1
    def advertise(self) -> Advertise:
        self._advance("new", "advertised")
        return Advertise(
            self.session,
            self.round,
            self.party,
            crypto.public_bytes(self._cipher_sk),
            crypto.public_bytes(self._mask_sk),
        )

    # stage 2
    def share_keys(self, roster: Roster) -> list[EncryptedShare]:
        """Shamir-share the self-mask seed and the mask private key among the roster's neighbours, one sealed
        pair of shares per neighbour."""
        self._expect("advertised")
        self._check_context(roster.session, roster.round, roster.party, "roster")
        advertised = set(roster.advertised)
        if self.party not in advertised:
            raise SecAggRefused(f"party {self.party}: the roster does not list this party as having advertised")
        degree, threshold = self.plan.neighbourhood(len(advertised))
        if threshold > degree:
            raise SecAggRefused(
                f"party {self.party}: only {len(advertised)} parties advertised, too few for threshold {threshold}"
            )
        mine = graph.neighbours_of(advertised, degree, roster.graph_seed, self.party)
        if set(roster.cipher_pks) != mine or set(roster.mask_pks) != mine:
            raise SecAggRefused(
                f"party {self.party}: the roster's keys are not those of its neighbours {sorted(mine)} in the graph "
                f"of seed {roster.graph_seed}"
            )
        keys = [*roster.cipher_pks.values(), *roster.mask_pks.values(), *self._own_public_keys()]
        if len(set(keys)) != len(keys):
            raise SecAggRefused(f"party {self.party}: the roster repeats a public key")
        self.neighbours, self.threshold = frozenset(mine), threshold
        self._mask_pks = dict(roster.mask_pks)
        xs = sorted(mine)
        seed_shares = shamir.split(self._self_seed, threshold, xs)
        key_shares = shamir.split(crypto.private_bytes(self._mask_sk), threshold, xs)
        out = []
        for j in xs:
            self._cipher_secrets[j] = crypto.agree(self._cipher_sk, roster.cipher_pks[j])
            plaintext = shamir.encode(seed_shares[j]) + shamir.encode(key_shares[j])
            key = crypto.derive(self._cipher_secrets[j], self.session, self.round, (self.party, j), crypto.SHARE)
            sealed = crypto.seal(key, plaintext, crypto.share_aad(self.session, self.round, self.party, j))
            out.append(EncryptedShare(self.session, self.round, self.party, j, sealed))
        self._stage = "shared"
        return out

    # stage 3
    def prepare_masks(self, inbox: list[EncryptedShare], length: int, out: np.ndarray | None = None) -> None:
        """The sum of the masks ``masked_input(values, weight, inbox)`` adds, made ahead for ``length`` values
        (and the weight), into ``out`` if given (as for ``masked_input``). The inbox is checked as there: a bad
        one withdraws the party (SecAggRefused)."""
        self._expect("shared")
        self._accept_or_withdraw(inbox)
        data = self._buffer(length + 1, out)
        add_masks(data, self._masks(), overwrite=True)
        self._prepared = (list(inbox), data)
        self._stage = "prepared"

    def prepared(self, count: int) -> bool:
        """Whether masks for ``count`` values are made ahead (``masked_input`` of that many then uses them)."""
        return self._prepared is not None and self._prepared[1].size == count + 1

    def masked_input(
        self, values: np.ndarray, weight: float, inbox: list[EncryptedShare], out: np.ndarray | None = None
    ) -> MaskedInput:
        """Quantise f * clip(values) and f (f = min(weight, max_weight) / max_weight), then add the self mask and
        a pairwise mask with every neighbour whose share is in the inbox (+ when this party's id is the lower).
        ``out``: a buffer for the masked input (values.size + 1 of the plan's dtype) to write instead of a new
        one, e.g. the last round's once its upload is done (a fresh model-sized buffer pays its page faults).
        After ``prepare_masks`` with this inbox and values.size, the values go into the masks made there (and
        ``out`` is not used); after it with another size, the masks are made again here."""
        prepared, self._prepared = self._prepared, None
        if self._stage == "prepared":
            self._stage = "shared"
        self._expect("shared")
        flat = np.asarray(values)
        if flat.ndim != 1 or flat.dtype.kind != "f":
            raise ValueError(f"party {self.party}: values must be a flat float vector, got {flat.dtype} {flat.shape}")
        if not _all_finite(flat):
            raise ValueError(f"party {self.party}: the update holds NaN or inf (the server cannot see it under masks)")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"party {self.party}: the weight must be a finite number > 0, got {weight!r}")
        cfg, plan = self.config, self.plan
        factor = min(float(weight), cfg.max_weight) / cfg.max_weight
        if prepared is not None and prepared[0] == list(inbox) and prepared[1].size == flat.size + 1:
            data = prepared[1]  # the inbox was accepted there
            quantize(flat, cfg.clip, cfg.bits, plan.dtype, self._rng, scale=factor, out=data[:-1], add=True)
            data[-1:] += quantize_weight(factor, plan.weight_levels, plan.dtype, self._rng)
        else:
            self._accept_or_withdraw(inbox)
            data = self._buffer(flat.size + 1, out)
            quantize(flat, cfg.clip, cfg.bits, plan.dtype, self._rng, scale=factor, out=data[:-1])
            data[-1:] = quantize_weight(factor, plan.weight_levels, plan.dtype, self._rng)
            add_masks(data, self._masks())
        # the secrets live on only as shares now: a party compromised later reveals nothing of this round
        self._self_seed = b""
        self._mask_sk = self._cipher_sk = None
        self._cipher_secrets.clear()
        self._stage = "masked"
        return MaskedInput(self.session, self.round, self.party, data)

    # stage 4
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Shares of the alive neighbours' self-mask seeds and of the dropped neighbours' mask keys, after the
        checks in the module's docstring; SecAggRefused (and nothing revealed) when one fails."""
        self._expect("masked")
        self._check_context(request.session, request.round, request.party, "unmask request")
        me = self.party
        alive, dropped = frozenset(request.alive), frozenset(request.dropped)
        if me in dropped or me not in alive:
            raise SecAggRefused(
                f"party {me}: the unmask request does not count this party, which sent its input, alive"
            )
        if alive & dropped:
            raise SecAggRefused(
                f"party {me}: the unmask request calls {sorted(alive & dropped)} both alive and dropped"
            )
        strangers = (alive | dropped) - self.neighbours - {me}
        if strangers:
            raise SecAggRefused(f"party {me}: the unmask request names {sorted(strangers)}, not its neighbours")
        unknown = (alive | dropped) - set(self._held) - {me}
        if unknown:
            raise SecAggRefused(f"party {me}: the unmask request names {sorted(unknown)}, which sent it no shares")
        if len(alive) < self.threshold:
            raise SecAggRefused(
                f"party {me}: only {len(alive)} of its neighbourhood are said to be alive, fewer than the threshold "
                f"{self.threshold}: the sum would expose too few parties"
            )
        both = {j for j in alive if self._revealed.get(j) == _KEY} | {
            j for j in dropped if self._revealed.get(j) == _SELF
        }
        if both:
            raise SecAggRefused(
                f"party {me}: refuses to reveal the second kind of share of {sorted(both)} "
                f"(the server would unmask them)"
            )
        for j in alive - {me}:
            self._revealed[j] = _SELF
        for j in dropped:
            self._revealed[j] = _KEY
        return UnmaskReply(
            self.session,
            self.round,
            me,
            self_shares={j: self._held[j][0] for j in sorted(alive - {me})},
            key_shares={j: self._held[j][1] for j in sorted(dropped)},
        )

    def _masks(self) -> list[tuple[bytes, int]]:
        """The self mask's key, then each inbox sender's pairwise mask key, with the sign this party adds it."""
        masks = [(crypto.derive(self._self_seed, self.session, self.round, (self.party,), crypto.SELF_MASK), 1)]
        for j in sorted(self._held):
            secret = crypto.agree(self._mask_sk, self._mask_pks[j])
            pair = (min(self.party, j), max(self.party, j))
            masks.append(
                (crypto.derive(secret, self.session, self.round, pair, crypto.PAIR_MASK), pair_sign(self.party, j))
            )
        return masks

    def _buffer(self, size: int, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty(size, dtype=self.plan.dtype)
        if out.shape == (size,) and out.dtype == self.plan.dtype and out.flags.c_contiguous:
            return out
        raise ValueError(f"party {self.party}: out must be a flat {size} x {self.plan.dtype}, got {out.dtype} "
                         f"{out.shape}")  # fmt: skip

    def _accept_or_withdraw(self, inbox: list[EncryptedShare]) -> None:
        try:
            self._accept(inbox)
        except SecAggRefused:
            self._stage = "withdrawn"
            raise

    def _accept(self, inbox: list[EncryptedShare]) -> None:
        held: dict[int, tuple[int, int]] = {}
        for share in inbox:
            sender = share.sender
            self._check_context(share.session, share.round, share.receiver, f"share from {sender}")
            if sender not in self.neighbours:
                raise SecAggRefused(f"party {self.party}: refused a share from {sender}, not its neighbour")
            if sender in held:
                raise SecAggRefused(f"party {self.party}: refused a second share from {sender}")
            key = crypto.derive(
                self._cipher_secrets[sender], self.session, self.round, (sender, self.party), crypto.SHARE
            )
            plaintext = crypto.unseal(
                key, share.ciphertext, crypto.share_aad(self.session, self.round, sender, self.party)
            )
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                raise SecAggRefused(f"party {self.party}: the share from {sender} has the wrong length")
            try:
                held[sender] = (
                    shamir.decode(plaintext[: shamir.SHARE_BYTES]),
                    shamir.decode(plaintext[shamir.SHARE_BYTES :]),
                )
            except ValueError as exc:
                raise SecAggRefused(f"party {self.party}: the share from {sender} is not a field element") from exc
        self._held = held

    def _check_context(self, session: str, round: int, party: int, what: str) -> None:
        if session != self.session or round != self.round or party != self.party:
            raise SecAggRefused(
                f"party {self.party}: refused a {what} for session {session!r} round {round} party {party} "
                f"(this is session {self.session!r} round {self.round})"
            )

    def _own_public_keys(self) -> list[bytes]:
        return [crypto.public_bytes(self._cipher_sk), crypto.public_bytes(self._mask_sk)]

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggRefused(f"party {self.party}: asked for the {stage} stage's step while at {self._stage!r}")

    def _advance(self, stage: str, to: str) -> None:
        self._expect(stage)
        self._stage = to


def _all_finite(values: np.ndarray, chunk: int = 1 << 16) -> bool:
    """np.isfinite(values).all() a chunk at a time: no model-sized temporary."""
    return all(np.isfinite(values[lo : lo + chunk]).all() for lo in range(0, values.size, chunk))


def pair_sign(party: int, peer: int) -> int:
    """The sign of the pairwise mask ``party`` adds for ``peer``: + for the lower id, - for the higher."""
    return 1 if party < peer else -1
