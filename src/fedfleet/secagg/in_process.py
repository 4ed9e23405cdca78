"""Secure aggregation where the parties live in the arbiter's process: the simulation and ``LocalFederation``.

The round loop builds this aggregator instead of the strategy's weighted mean when a job asks for secure
aggregation. It plays every party of the round and the server with the same state machines a deployed round
uses, so the model, the dropout handling and the quantisation error are what a deployment gets:

    built (round start)   every party asked to train advertises keys and sends its shares
    add(update)           the party masks its own update (clipped, weight-scaled, quantised) -> the ring sum
    finish()              the parties still online answer the unmask request; the server unmasks the sum

A party that was asked but never delivers (it went offline while training, or came too late) dropped after its
shares; one that delivered but is offline when the unmask request comes (``offline_at_unmask``) dropped before
unmasking. ``overhead_s`` is what the protocol adds to the round on the virtual clock: three message exchanges
(adverts, shares, unmask) at the slowest survivor's link speed, plus the slowest party's crypto time measured here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch

from fedfleet.core.aggregate import MetricMean, shown
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update
from fedfleet.errors import ConfigError
from fedfleet.secagg.config import SecAggConfig
from fedfleet.secagg.party import SecAggParty
from fedfleet.secagg.server import SecAggResult, SecAggServer

ADVERT_BYTES = 64  # two X25519 public keys
SHARE_BYTES = 2 * 66 + 28  # two Shamir shares over GF(2**521 - 1), AES-GCM nonce and tag


def graph_seed(seed: int, round: int) -> int:
    """The round's share-graph seed, announced by the server (deterministic: a seeded run repeats)."""
    return int(np.random.SeedSequence([seed, round, 0x5EC]).generate_state(1, np.uint64)[0] >> 1)


class InProcessSecureSum:
    """An aggregator (``add`` / ``finish``) that sums the round's updates under SecAgg+ masks; see the module doc.

    ``latency(client, download_bytes, upload_bytes)``: virtual seconds of one small exchange for a client (the
    clock's link model); ``offline_at_unmask``: the clients offline when the unmask request comes."""

    mergeable = False  # a partial fold would need its own masks: each party's masked input comes to the top

    def __init__(
        self,
        config: SecAggConfig,
        global_params: FlatParams,
        cohort: Sequence[int | str],
        round: int,
        seed: int,
        session: str = "fedfleet",
        latency: Callable[[int | str, int, int], float] | None = None,
        offline_at_unmask: Callable[[Collection[int | str]], Collection[int | str]] | None = None,
    ) -> None:
        dtypes = [d for d in global_params.buffers if not d.is_floating_point]
        if dtypes:
            raise ConfigError(f"secure aggregation sums float params; these are {dtypes}")
        self.like = global_params
        self.ids = {client: i + 1 for i, client in enumerate(cohort)}  # Shamir x-coordinates start at 1
        self.clients = {i: client for client, i in self.ids.items()}
        self.latency = latency
        self.offline_at_unmask = offline_at_unmask
        self.server = SecAggServer(session, round, config, list(self.clients), graph_seed(seed, round),
                                   length=global_params.numel)  # fmt: skip
        plan = self.server.plan
        self.parties = {i: SecAggParty(i, session, round, config, plan, seed=(seed, round, i)) for i in self.clients}
        self.crypto_s = dict.fromkeys(self.clients, 0.0)  # wall seconds each party spent on the protocol
        for i, party in self.parties.items():
            self.server.receive_advert(self._timed(i, party.advertise))
        for i, roster in self.server.rosters().items():
            self.server.receive_shares(i, self._timed(i, lambda p=self.parties[i], r=roster: p.share_keys(r)))
        self.inboxes = self.server.inboxes()  # SecAggFailed here (too few share holders): the round is run again
        self.metrics = MetricMean()
        self.delivered: list[int | str] = []

    def add(self, update: Update) -> None:
        party = self.ids.get(update.client_id)
        if party is None:
            raise ValueError(f"client {update.client_id!r} was not asked to train in this secure round")
        values = flatten(update.params)
        mask = self.parties[party].masked_input
        masked = self._timed(party, lambda: mask(values, update.weight, self.inboxes[party]))
        self.server.receive_masked_input(masked)
        self.metrics.add(shown(update), float(update.weight))
        self.delivered.append(update.client_id)

    def merge(self, other: Any) -> None:
        raise TypeError("secure aggregation folds each party's masked input itself; a partial fold cannot merge")

    def finish(self) -> Aggregate:
        requests = self.server.unmask_requests()  # SecAggFailed when too few masked inputs arrived
        gone = set(self.offline_at_unmask(self.delivered)) if self.offline_at_unmask else set()
        for i, request in requests.items():
            if self.clients[i] not in gone:
                self.server.receive_unmask_reply(self._timed(i, lambda p=self.parties[i], r=request: p.unmask(r)))
        result = self.server.result()
        params = mean_params(result, self.like)
        survivors = [self.clients[i] for i in sorted(result.survivors)]
        aggregate = Aggregate(params, result.weight, len(survivors), self.metrics.means())
        aggregate.overhead_s = self._overhead(survivors)
        self.mean_bound = result.mean_bound()  # per element, |params - the exact weighted mean| is below it
        return aggregate

    def _timed(self, party: int, work: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            return work()
        finally:
            self.crypto_s[party] += time.perf_counter() - began

    def _overhead(self, survivors: list[int | str]) -> float:
        """Virtual seconds the protocol adds: its three small exchanges, then the slowest party's crypto."""
        degree = self.server.plan.degree
        exchanges = [(ADVERT_BYTES, degree * ADVERT_BYTES), (degree * SHARE_BYTES, degree * SHARE_BYTES),
                     (4 * degree, degree * SHARE_BYTES // 2)]  # fmt: skip
        slowest = 0.0
        if self.latency is not None:
            for client in survivors:
                slowest = max(slowest, sum(self.latency(client, down, up) for up, down in exchanges))
        return slowest + max(self.crypto_s[self.ids[c]] for c in survivors)


def flatten(params: FlatParams) -> np.ndarray:
    """One float vector of every buffer (dtype order fixed by the spec): a view for a float32-only model. What a
    party masks (here, and a deployed party before it sends its masked input)."""
    buffers = [params.buffers[d].detach().reshape(-1) for d in sorted(params.buffers, key=str)]
    if len(buffers) == 1 and buffers[0].dtype in (torch.float32, torch.float64):
        return buffers[0].cpu().numpy()
    return torch.cat([b.float().cpu() for b in buffers]).numpy()


def mean_params(result: SecAggResult, like: FlatParams, chunk: int = 1 << 15) -> FlatParams:
    """``result.mean()`` in new params of ``like``'s layout (``flatten``'s order), the same numbers, dequantised a
    chunk at a time straight into them: no model-sized float64 vectors, where ``mean()`` makes two."""
    out = like.zeros_like()
    scratch = np.empty(chunk)
    offset = 0
    for dtype in sorted(out.buffers, key=str):
        flat = out.buffers[dtype].reshape(-1)
        for lo in range(0, flat.numel(), chunk):
            piece = flat[lo : lo + chunk]
            piece.copy_(torch.from_numpy(result.mean_of(offset + lo, scratch[: piece.numel()])))
        offset += flat.numel()
    return out


class SecureAggregation:
    """The pipeline's secure-aggregation element (``Pipeline(secure=SecureAggregation(config))``): each round's
    aggregator is an :class:`InProcessSecureSum` in place of the strategy's weighted mean."""

    def __init__(self, config: SecAggConfig, session: str = "fedfleet") -> None:
        self.config = config
        self.session = session

    def aggregator(self, inner: Any, global_params: FlatParams, context: Any) -> InProcessSecureSum:
        check_weighted_mean(inner)
        return InProcessSecureSum(
            self.config, global_params, context.cohort, context.round, context.seed, self.session,
            context.latency, context.offline_at_unmask,
        )  # fmt: skip

    def native(self, inner: Any) -> Any:
        """The round's aggregator on a runtime that runs the protocol with its parties itself (the gRPC arbiter's
        server-driven rounds): the strategy's own weighted mean, which merges the runtime's one unmasked partial."""
        return check_weighted_mean(inner)


def check_weighted_mean(inner: Any) -> Any:
    """``inner`` when it is a weighted mean (all secure aggregation can give); a ConfigError otherwise."""
    if not getattr(inner, "weighted_mean", False):
        raise ConfigError(
            f"secure aggregation gives the arbiter only the weighted sum of the updates, but this strategy "
            f"aggregates with {type(inner).__name__}, which needs each update (use fedavg, fedavgm, fedprox, "
            "fedadam, fedyogi or fedadagrad)"
        )
    return inner
