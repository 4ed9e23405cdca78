"""The two ways a secure-aggregation round goes wrong: one message is refused, or the whole round fails."""

from __future__ import annotations

from fedfleet.core.loop import RoundIncomplete


class SecAggRefused(Exception):
    """A party or the server refuses one message or request (wrong session, round or addressee, a bad tag, a
    request that would reveal both kinds of share of one peer). The runtime counts it like its other rejections;
    a party that refuses its inbox withdraws from the round, which the others survive as a dropout."""


class SecAggFailed(RoundIncomplete):
    """Too few parties or shares are left to unmask the sum: nothing is folded, and the round loop's retry runs
    the round again (a RoundIncomplete)."""
