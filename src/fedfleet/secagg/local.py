"""One SecAgg+ round played in memory: every party and the server, with dropouts at chosen stages.

The tests use it, and the in-process simulation drives the same state machines through it. Each masked input
goes into the server's running sum as soon as it is made, so beside the caller's inputs the round holds O(model)
memory, and each party's work is O(k * model) (its self mask and one pairwise mask per neighbour).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np

from fedfleet.secagg.config import SecAggConfig
from fedfleet.secagg.messages import UnmaskReply
from fedfleet.secagg.party import SecAggParty
from fedfleet.secagg.server import SecAggResult, SecAggServer


class Stage(enum.Enum):
    """Where a party drops out: it sends nothing from that stage on."""

    ADVERTISE = "advertise"  # before advertising its keys: it is not in the graph at all
    SHARE = "share"  # after advertising, before sending its shares
    MASKED_INPUT = "masked_input"  # after sending its shares, before its masked input
    UNMASK = "unmask"  # after its masked input, before any unmask reply
    DURING_UNMASK = "during_unmask"  # halfway through its reply: only the first half of its shares arrive


def run_round(
    inputs: Mapping[int, np.ndarray],
    weights: Mapping[int, float],
    config: SecAggConfig,
    session: str = "s",
    round: int = 0,
    drop: Mapping[Stage, set[int]] | None = None,
    seed: int = 0,
) -> SecAggResult:
    """Securely sum ``inputs`` (flat float vectors, one per party id >= 1) with ``weights``; raises SecAggFailed
    when too few parties remain. ``seed`` fixes the graph and the stochastic rounding (party i rounds with
    ``np.random.default_rng((seed, round, i))``), so the result repeats bit for bit; the keys and shares are fresh
    from the OS every time and cancel exactly."""
    ids = sorted(inputs)
    if set(weights) != set(ids):
        raise ValueError("inputs and weights must name the same parties")
    gone: dict[Stage, set[int]] = {stage: set() for stage in Stage}
    for stage, who in (drop or {}).items():
        if not set(who) <= set(ids):
            raise ValueError(f"drop[{stage.name}] names parties without inputs: {sorted(set(who) - set(ids))}")
        gone[Stage(stage)] |= set(who)
    graph_seed = int(np.random.SeedSequence([seed, round]).generate_state(1, np.uint64)[0] >> 1)
    length = int(np.asarray(inputs[ids[0]]).size) if ids else None
    server = SecAggServer(session, round, config, ids, graph_seed, length=length)
    parties = {i: SecAggParty(i, session, round, config, server.plan, seed=(seed, round, i)) for i in ids}

    for i in ids:
        if i not in gone[Stage.ADVERTISE]:
            server.receive_advert(parties[i].advertise())
    for i, roster in server.rosters().items():
        if i not in gone[Stage.SHARE]:
            server.receive_shares(i, parties[i].share_keys(roster))
    for i, inbox in server.inboxes().items():
        if i not in gone[Stage.MASKED_INPUT]:
            server.receive_masked_input(parties[i].masked_input(inputs[i], weights[i], inbox))
    for i, request in server.unmask_requests().items():
        if i not in gone[Stage.UNMASK]:
            reply = parties[i].unmask(request)
            server.receive_unmask_reply(_cut(reply) if i in gone[Stage.DURING_UNMASK] else reply)
    return server.result()


def _cut(reply: UnmaskReply) -> UnmaskReply:
    """The part of a reply that arrived before the party went: the first half of each kind of share."""
    self_shares = dict(list(reply.self_shares.items())[: len(reply.self_shares) // 2])
    key_shares = dict(list(reply.key_shares.items())[: len(reply.key_shares) // 2])
    return UnmaskReply(reply.session, reply.round, reply.party, self_shares, key_shares)
