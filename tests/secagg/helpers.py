"""Inputs for secure-aggregation tests, the plain integer sum they must unmask to, and a round driven by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedfleet.secagg import SecAggConfig, SecAggParty, SecAggServer
from fedfleet.secagg.quantize import quantize, quantize_weight


def make_inputs(n: int, m: int, seed: int = 0, first: int = 1) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """n parties' float32 updates of m params (some beyond the clip range) and weights (some above the cap)."""
    rng = np.random.default_rng(seed)
    ids = range(first, first + n)
    inputs = {i: rng.normal(0.0, 0.6, m).astype(np.float32) for i in ids}
    weights = {i: float(rng.choice([3.0, 50.0, 700.0, 5000.0])) for i in ids}
    return inputs, weights


def plain_total(inputs, weights, config: SecAggConfig, survivors, seed: int = 0, round: int = 0) -> np.ndarray:
    """The survivors' quantised vectors (params, then weight) summed as plain integers, without any masking:
    each quantised again here with run_round's rounding generator, np.random.default_rng((seed, round, i))."""
    plan = config.validate(len(inputs))
    total = None
    for i in sorted(survivors):
        rng = np.random.default_rng((seed, round, i))
        f = min(weights[i], config.max_weight) / config.max_weight
        q = quantize(inputs[i], config.clip, config.bits, plan.dtype, rng, scale=f).astype(object)
        w = quantize_weight(f, plan.weight_levels, plan.dtype, rng).astype(object)
        vec = np.concatenate([q, w])
        total = vec if total is None else total + vec  # Python ints: no wrap-around can hide an error
    return total


def true_mean(inputs, weights, config: SecAggConfig, survivors) -> np.ndarray:
    """The float64 weighted mean of the survivors' clipped updates, with the capped weights."""
    f = {i: min(weights[i], config.max_weight) for i in survivors}
    clipped = {i: np.clip(inputs[i].astype(np.float64), -config.clip, config.clip) for i in survivors}
    return sum(f[i] * clipped[i] for i in survivors) / sum(f.values())


@dataclass
class HandRound:
    """Every party and the server of one round, stepped by the test so it can intercept any message."""

    inputs: dict[int, np.ndarray]
    weights: dict[int, float]
    config: SecAggConfig
    session: str = "s"
    round: int = 0
    seed: int = 0
    server: SecAggServer = field(init=False)
    parties: dict[int, SecAggParty] = field(init=False)

    def __post_init__(self) -> None:
        ids = sorted(self.inputs)
        self.server = SecAggServer(self.session, self.round, self.config, ids, graph_seed=7)
        self.parties = {
            i: SecAggParty(i, self.session, self.round, self.config, self.server.plan, seed=(self.seed, self.round, i))
            for i in ids
        }

    def advertise(self):
        for p in self.parties.values():
            self.server.receive_advert(p.advertise())
        return self.server.rosters()

    def share(self, rosters):
        for i, roster in rosters.items():
            self.server.receive_shares(i, self.parties[i].share_keys(roster))
        return self.server.inboxes()

    def mask(self, inboxes, skip=()):
        out = {}
        for i, inbox in inboxes.items():
            if i not in skip:
                out[i] = self.parties[i].masked_input(self.inputs[i], self.weights[i], inbox)
                self.server.receive_masked_input(out[i])
        return out

    def to_unmask(self):
        """Up to the unmask requests, every party honest and present."""
        self.mask(self.share(self.advertise()))
        return self.server.unmask_requests()

    def finish(self, requests):
        for i, request in requests.items():
            self.server.receive_unmask_reply(self.parties[i].unmask(request))
        return self.server.result()
