"""Secure aggregation (SecAgg+, Bell et al. CCS 2020; SecAgg, Bonawitz et al. CCS 2017 with k = n - 1): the
server learns only the weighted sum of the surviving parties' updates, and the round survives dropouts at every
stage while enough parties remain. Pure state machines: no sockets, no threads; the runtimes carry the messages.

Public API (``from fedfleet.secagg import ...``):

- ``SecAggConfig(neighbours=None, threshold=0.5, clip=1.0, bits=16, max_weight=1000.0)``: settings;
  ``.validate(n_parties) -> Plan`` raises ConfigError naming the key and its bound.
- ``Plan``: what a round's parties and server agree on (degree, threshold, ring_bits, dtype, weight_levels,
  ``neighbourhood(m)`` for m advertisers).
- ``SecAggParty(party, session, round, config, plan, *, seed=None)``: one party for one round:
  ``advertise() -> Advertise``, ``share_keys(Roster) -> list[EncryptedShare]``,
  ``masked_input(values, weight, inbox, out=None) -> MaskedInput``, ``unmask(UnmaskRequest) -> UnmaskReply``;
  ``prepare_masks(inbox, length, out=None)`` before the update is there sums the masks ahead (``prepared(n)``
  says whether ``masked_input`` of n values will use them).
- ``SecAggServer(session, round, config, parties, graph_seed, *, length=None)``: ``receive_advert``,
  ``rosters()``, ``receive_shares(party, shares)``, ``inboxes()``, ``receive_masked_input``,
  ``unmask_requests()``, ``receive_unmask_reply``, ``result() -> SecAggResult``.
- ``SecAggResult(total, factors, weight, survivors, sum_bound, factors_bound, clip, bits)``: the exact ring
  sum, sum of f_i, sum of capped weights, who is in it, error bounds; ``.sum`` (the dequantised sum of
  f_i * clip(x_i)), ``.mean()``, ``.mean_of(start, out)`` (a slice of the mean) and ``.mean_bound()``.
- Messages: ``Advertise``, ``Roster``, ``EncryptedShare``, ``MaskedInput``, ``UnmaskRequest``, ``UnmaskReply``.
- ``run_round(inputs, weights, config, session="s", round=0, drop=None, seed=0) -> SecAggResult`` and
  ``Stage`` (ADVERTISE, SHARE, MASKED_INPUT, UNMASK, DURING_UNMASK): the whole round in memory.
- ``SecAggRefused`` (one message or request refused) and ``SecAggFailed`` (the round cannot be unmasked; a
  RoundIncomplete, so the round loop runs it again).
- ``SecureAggregation(config)``: the pipeline's element (``Pipeline(secure=...)``) for runtimes whose parties are
  in the arbiter's process (the simulation, ``LocalFederation``): each round is an ``InProcessSecureSum``.

Modules: config (settings, plan), quantize (fixed point, stochastic rounding, the error bound), shamir (secret
sharing over GF(2**521 - 1)), crypto (X25519, HKDF-SHA256, AES-256-GCM), masks (AES-128-CTR mask streams added
in place), graph (the seeded k-regular share graph), messages, party, server, local, errors, in_process.

What the server cannot check under the masks (finite values, norms), the party checks before masking:
``masked_input`` refuses NaN and inf, clips every param to [-clip, clip] and caps the weight at max_weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedfleet.lazy import lazy_names

# public name -> the module that defines it: imported on first use, so a config parser that only needs
# SecAggConfig loads numpy, not torch (SecAggFailed is the round loop's RoundIncomplete, which brings torch)
_LAZY = {
    "Plan": "fedfleet.secagg.config",
    "SecAggConfig": "fedfleet.secagg.config",
    "SecAggFailed": "fedfleet.secagg.errors",
    "SecAggRefused": "fedfleet.secagg.errors",
    "Stage": "fedfleet.secagg.local",
    "run_round": "fedfleet.secagg.local",
    "Advertise": "fedfleet.secagg.messages",
    "EncryptedShare": "fedfleet.secagg.messages",
    "MaskedInput": "fedfleet.secagg.messages",
    "Roster": "fedfleet.secagg.messages",
    "UnmaskReply": "fedfleet.secagg.messages",
    "UnmaskRequest": "fedfleet.secagg.messages",
    "SecAggParty": "fedfleet.secagg.party",
    "SecAggResult": "fedfleet.secagg.server",
    "SecAggServer": "fedfleet.secagg.server",
    "InProcessSecureSum": "fedfleet.secagg.in_process",
    "SecureAggregation": "fedfleet.secagg.in_process",
}

__all__ = [
    "Advertise",
    "EncryptedShare",
    "InProcessSecureSum",
    "MaskedInput",
    "Plan",
    "Roster",
    "SecAggConfig",
    "SecAggFailed",
    "SecAggParty",
    "SecAggRefused",
    "SecAggResult",
    "SecAggServer",
    "SecureAggregation",
    "Stage",
    "UnmaskReply",
    "UnmaskRequest",
    "run_round",
]

if TYPE_CHECKING:
    from fedfleet.secagg.config import Plan, SecAggConfig
    from fedfleet.secagg.errors import SecAggFailed, SecAggRefused
    from fedfleet.secagg.in_process import InProcessSecureSum, SecureAggregation
    from fedfleet.secagg.local import Stage, run_round
    from fedfleet.secagg.messages import Advertise, EncryptedShare, MaskedInput, Roster, UnmaskReply, UnmaskRequest
    from fedfleet.secagg.party import SecAggParty
    from fedfleet.secagg.server import SecAggResult, SecAggServer


__getattr__ = lazy_names("fedfleet.secagg", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
