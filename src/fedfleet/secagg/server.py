"""The server's side of one SecAgg+ round: collect, route, and unmask the sum, never any one party's input.

Each stage collects messages until the runtime closes it (on its deadline or when everyone answered); a message
for another session or round, from a stranger, twice, or after its stage closed is refused (SecAggRefused) and
changes nothing. Closing a stage returns what the runtime sends next:

    receive_advert(a)*            -> rosters()          {party: Roster}            (who advertised: U1)
    receive_shares(party, list)*  -> inboxes()          {party: [EncryptedShare]}  (who shared: U2)
    receive_masked_input(m)*      -> unmask_requests()  {party: UnmaskRequest}     (who sent input: alive)
    receive_unmask_reply(r)*      -> result()           SecAggResult

Parties that did not advertise are left out of the graph (never waited for); parties that did not share are
left out of the masks. When a party's shares reached fewer than ``threshold`` neighbours that shared theirs, its
input could never be unmasked, and ``inboxes`` fails the round. (Leaving that party out instead would take a
share holder from each of its neighbours, and on a circulant graph the hole spreads around the ring: the round
would fail anyway, later, after parties had revealed more.) The masked inputs are
summed as they arrive (memory O(model), whatever the number of parties). SecAggFailed (nothing to fold) when too
few parties or shares remain, raised before any party is asked to reveal a share where it can be foreseen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.secagg import crypto, graph, shamir
from fedfleet.secagg.config import SecAggConfig
from fedfleet.secagg.errors import SecAggFailed, SecAggRefused
from fedfleet.secagg.masks import add_masks
from fedfleet.secagg.messages import Advertise, EncryptedShare, MaskedInput, Roster, UnmaskReply, UnmaskRequest
from fedfleet.secagg.party import check_party_id, pair_sign
from fedfleet.secagg.quantize import dequantize, dequantize_weight, step


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """``total``: the unmasked ring sum itself (the params' quantised sum, then the weights'), exact integers, of
    the ``survivors``; ``factors`` = sum of f_i, f_i = min(w_i, max_weight) / max_weight; ``weight`` = factors *
    max_weight (the survivors' capped weights summed). ``sum`` dequantises it: sum of f_i * clip(x_i) (float64).

    Error bounds, per element (quantize.py): |sum - true sum| < ``sum_bound`` = count * step, with
    step = 2 * clip / (2**bits - 1); |factors - true factors| <= count / weight_levels; hence ``mean_bound()``.
    ``mean_of`` dequantises a slice at a time, so a model's mean can be written into its params without a
    model-sized float64 vector (two of them for ``mean()``)."""

    total: np.ndarray
    factors: float
    weight: float
    survivors: frozenset[int]
    sum_bound: float
    factors_bound: float
    clip: float
    bits: int

    @property
    def sum(self) -> np.ndarray:
        return dequantize(self.total[:-1], len(self.survivors), self.clip, self.bits)

    def mean(self) -> np.ndarray:
        """The weighted mean of the survivors' clipped updates: sum f_i x_i / sum f_i."""
        return self.sum / self.factors

    def mean_of(self, start: int, out: np.ndarray) -> np.ndarray:
        """``mean()[start : start + out.size]`` written into ``out`` (float64), the same float64 operations in
        the same order (the same numbers, bit for bit)."""
        dequantize(self.total[start : start + out.size], len(self.survivors), self.clip, self.bits, out=out)
        out /= self.factors
        return out

    def mean_bound(self) -> float:
        """Per element, |mean() - the exact weighted mean of the clipped updates| is below this: the sum's error
        plus the mean's magnitude (at most clip) times the weights' error, over the weights' smallest value."""
        return (self.sum_bound + self.clip * self.factors_bound) / (self.factors - self.factors_bound)


class SecAggServer:
    def __init__(
        self,
        session: str,
        round: int,
        config: SecAggConfig,
        parties: list[int],
        graph_seed: int,
        *,
        length: int | None = None,
    ) -> None:
        """``parties``: the round's cohort; ``length``: params per input (taken from the first input if None)."""
        if len(set(parties)) != len(parties):
            raise ValueError("the cohort lists a party twice")
        self.parties = frozenset(check_party_id(p) for p in parties)
        self.session, self.round, self.config, self.graph_seed = session, round, config, graph_seed
        self.plan = config.validate(len(parties))
        self.length = length
        self.threshold = self.plan.threshold
        self.graph: dict[int, frozenset[int]] = {}
        self._stage = "advertise"
        self._adverts: dict[int, Advertise] = {}
        self._shares: dict[int, list[EncryptedShare]] = {}
        self._shared: frozenset[int] = frozenset()
        self._sum: np.ndarray | None = None
        self._alive: set[int] = set()
        self._requests: dict[int, UnmaskRequest] = {}
        self._replies: dict[int, UnmaskReply] = {}

    # stage 1
    def receive_advert(self, advert: Advertise) -> None:
        self._check("advertise", advert.session, advert.round, advert.party, self.parties, self._adverts, "advert")
        keys = (advert.cipher_pk, advert.mask_pk)
        if any(not isinstance(k, bytes) or len(k) != crypto.KEY_BYTES for k in keys) or keys[0] == keys[1]:
            raise SecAggRefused(f"party {advert.party}'s advert does not hold two distinct 32-byte public keys")
        self._adverts[advert.party] = advert

    def rosters(self) -> dict[int, Roster]:
        self._close("advertise", "shares")
        advertised = tuple(sorted(self._adverts))
        degree, self.threshold = self.plan.neighbourhood(len(advertised))
        if self.threshold > degree:
            raise SecAggFailed(
                f"secure aggregation: only {len(advertised)} of {len(self.parties)} parties advertised keys, too few "
                f"for a threshold of {self.threshold} shares"
            )
        self.graph = graph.neighbours(advertised, degree, self.graph_seed)
        out = {}
        for i in advertised:
            near = sorted(self.graph[i])
            cipher = {j: self._adverts[j].cipher_pk for j in near}
            mask = {j: self._adverts[j].mask_pk for j in near}
            out[i] = Roster(self.session, self.round, i, self.graph_seed, advertised, cipher, mask)
        return out

    # stage 2
    def receive_shares(self, party: int, shares: list[EncryptedShare]) -> None:
        self._check("shares", self.session, self.round, party, set(self._adverts), self._shares, "shares")
        for s in shares:
            if (s.session, s.round, s.sender) != (self.session, self.round, party) or not isinstance(
                s.ciphertext, bytes
            ):
                raise SecAggRefused(f"party {party} sent a share for another session, round or sender")
        receivers = [s.receiver for s in shares]
        if sorted(receivers) != sorted(self.graph[party]):
            raise SecAggRefused(
                f"party {party}'s shares are not one for each of its neighbours {sorted(self.graph[party])}"
            )
        self._shares[party] = list(shares)

    def inboxes(self) -> dict[int, list[EncryptedShare]]:
        self._close("shares", "masked")
        shared = frozenset(self._shares)
        for i in sorted(shared):
            holders = len(self.graph[i] & shared)
            if holders < self.threshold:
                raise SecAggFailed(
                    f"secure aggregation: party {i}'s shares reached only {holders} neighbours that shared theirs, "
                    f"fewer than the threshold {self.threshold}: its input could never be unmasked"
                )
        self._shared = frozenset(shared)
        inbox: dict[int, list[EncryptedShare]] = {i: [] for i in sorted(shared)}
        for sender in sorted(shared):
            for s in self._shares[sender]:
                if s.receiver in shared:
                    inbox[s.receiver].append(s)
        return inbox

    # stage 3
    def receive_masked_input(self, masked: MaskedInput) -> None:
        party = masked.party
        self._check("masked", masked.session, masked.round, party, self._shared, self._alive, "masked input")
        data = masked.data
        if not isinstance(data, np.ndarray) or data.dtype != self.plan.dtype or data.ndim != 1:
            raise SecAggRefused(f"party {party}'s masked input is not a flat {self.plan.dtype} vector")
        if self.length is None:
            self.length = data.size - 1
        if data.size != self.length + 1:
            raise SecAggRefused(f"party {party}'s masked input has {data.size - 1} params, the round has {self.length}")
        if self._sum is None:
            self._sum = np.zeros(data.size, dtype=self.plan.dtype)
        np.add(self._sum, data, out=self._sum)  # wraps mod 2**ring_bits: the masks' ring
        self._alive.add(party)

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        self._close("masked", "unmask")
        alive = frozenset(self._alive)
        dropped = self._shared - alive
        if len(alive) < self.threshold:
            raise SecAggFailed(
                f"secure aggregation: only {len(alive)} parties sent masked inputs, fewer than the threshold "
                f"{self.threshold}"
            )
        for i in sorted(self._shared):  # every secret the sum needs must have threshold holders alive
            held = len(self.graph[i] & alive)
            if i in dropped and not held:
                continue  # no live party masked with it: its key is not needed
            if held < self.threshold:
                what = "self-mask seed" if i in alive else "mask key"
                raise SecAggFailed(
                    f"secure aggregation: party {i}'s {what} is held by {held} live neighbours, fewer than the "
                    f"threshold {self.threshold}"
                )
        for i in sorted(alive):
            near = self.graph[i]
            self._requests[i] = UnmaskRequest(self.session, self.round, i, (near & alive) | {i}, near & dropped)
        return dict(self._requests)

    # stage 4
    def receive_unmask_reply(self, reply: UnmaskReply) -> None:
        party = reply.party
        self._check("unmask", reply.session, reply.round, party, set(self._requests), self._replies, "unmask reply")
        asked = self._requests[party]
        if not set(reply.self_shares) <= asked.alive - {party} or not set(reply.key_shares) <= asked.dropped:
            raise SecAggRefused(f"party {party}'s unmask reply holds shares it was not asked for")
        for value in (*reply.self_shares.values(), *reply.key_shares.values()):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < shamir.PRIME:
                raise SecAggRefused(f"party {party}'s unmask reply holds a share outside the field")
        self._replies[party] = reply

    def result(self) -> SecAggResult:
        """Remove every alive party's self mask and every dropped party's pairwise masks from the sum."""
        self._close("unmask", "done")
        alive = frozenset(self._alive)
        dropped = self._shared - alive
        seed_shares: dict[int, dict[int, int]] = {j: {} for j in alive}  # peer -> {holder: share}, in one pass
        key_shares: dict[int, dict[int, int]] = {d: {} for d in dropped}
        for holder, reply in self._replies.items():
            for j, share in reply.self_shares.items():
                seed_shares[j][holder] = share
            for d, share in reply.key_shares.items():
                key_shares[d][holder] = share
        masks = []
        for j in sorted(alive):
            seed = self._rebuild(j, seed_shares[j])
            masks.append((crypto.derive(seed, self.session, self.round, (j,), crypto.SELF_MASK), -1))
        for d in sorted(d for d in dropped if self.graph[d] & alive):
            raw = self._rebuild(d, key_shares[d])
            key = crypto.private_from_bytes(raw)
            if crypto.public_bytes(key) != self._adverts[d].mask_pk:
                raise SecAggFailed(f"secure aggregation: the shares of party {d}'s mask key rebuild a wrong key")
            for j in sorted(self.graph[d] & alive):  # j added pair_sign(j, d) * PRG(s_jd): take it out
                secret = crypto.agree(key, self._adverts[j].mask_pk)
                pair = (min(d, j), max(d, j))
                masks.append(
                    (crypto.derive(secret, self.session, self.round, pair, crypto.PAIR_MASK), -pair_sign(j, d))
                )
        total = self._sum
        assert total is not None  # alive is not empty: unmask_requests checked it
        add_masks(total, masks)
        self._sum = None
        cfg, count = self.config, len(alive)
        factors = dequantize_weight(int(total[-1]), self.plan.weight_levels)
        bounds = (count * step(cfg.clip, cfg.bits), count / self.plan.weight_levels)
        return SecAggResult(total, factors, factors * cfg.max_weight, alive, *bounds, cfg.clip, cfg.bits)

    def _rebuild(self, party: int, shares: dict[int, int]) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggFailed(
                f"secure aggregation: {len(shares)} shares of party {party}'s secret came back, fewer than the "
                f"threshold {self.threshold}"
            )
        try:
            return shamir.combine(shares, self.threshold)
        except ValueError as exc:
            raise SecAggFailed(f"secure aggregation: party {party}'s shares do not rebuild a secret: {exc}") from exc

    def _check(self, stage: str, session: str, round: int, party: int, members, seen, what: str) -> None:
        if (session, round) != (self.session, self.round):
            raise SecAggRefused(f"refused a {what} for session {session!r} round {round} from party {party}")
        if self._stage != stage:
            raise SecAggRefused(f"refused party {party}'s {what}: the {stage} stage is not open (at {self._stage})")
        if party not in members:
            raise SecAggRefused(f"refused a {what} from party {party}, which is not in this stage of the round")
        if party in seen:
            raise SecAggRefused(f"refused a second {what} from party {party}")

    def _close(self, stage: str, to: str) -> None:
        if self._stage != stage:
            raise SecAggRefused(f"cannot close the {stage} stage while at {self._stage}")
        self._stage = to
