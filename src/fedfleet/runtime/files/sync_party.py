"""Party-paced syncs through the exchange folder: the HF, Lightning and FSDP parties over the file runtime.

``FileContext(exchange, name, session)`` stands where ``create_context`` does for gRPC: a party's ``SyncDriver``
asks it for a channel, and the channel turns each of the party's syncs into a round of the folder's arbiter
(``fedfleet arbiter`` over ``runtime.kind: files``, or a ``FileRuntime`` a script drives): ``start`` waits for
round 1's global params and loads them; sync k publishes what the party trained since as round k's update (its
delta from round k's global, weight, loss statistics, the global's manifest SHA-256), then waits for round k+1's
global, or for the session's final params after its last round, and loads them. The job runs for the whole
session on nodes that see the folder; nothing dials anywhere. Secure aggregation is not available over files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import NO_STATS, TrainStats, Update
from fedfleet.errors import ConfigError
from fedfleet.runtime.files.exchange import MANIFEST, Exchange, Published, publish
from fedfleet.runtime.files.party import GlobalMissingError, wait_for_first
from fedfleet.runtime.files.runtime import ARBITER

log = logging.getLogger("fedfleet.party")


@dataclass(frozen=True)
class FileContext:
    """A party ``name`` of session ``session`` exchanging through folder ``exchange``; ``timeout``: seconds a sync
    waits for the next global params (a round waits for every party), ``poll_s``: the longest wait between looks."""

    exchange: str | Path
    name: str
    session: str
    timeout: float = 3600.0
    poll_s: float = 1.0
    is_arbiter: bool = False

    def channel(self, spec: Any, rounds: int, **extra: Any) -> FileChannel:
        if extra.get("secure"):
            raise ConfigError("secure aggregation needs the gRPC runtime: the file exchange has no masking rounds")
        return FileChannel(self, spec, rounds, pipeline=extra.get("pipeline"), seed=int(extra.get("seed", 0)))

    def sharded_channel(self, spec: Any, rounds: int, rank: int, world: int = 1) -> Any:
        """One rank's channel of the sharded exchange: it reads and writes only its own boxes (FSDP parties)."""
        from fedfleet.runtime.files.sharded_party import ShardedFileChannel

        return ShardedFileChannel(self, spec, rounds, rank)


class FileChannel:
    def __init__(self, ctx: FileContext, spec: Any, rounds: int, pipeline: Any = None, seed: int = 0) -> None:
        self.ctx = ctx
        self.exchange = Exchange(ctx.exchange)
        self.exchange.update_dir(1, ctx.name)  # a name that cannot be a folder is refused before any training
        self.spec = spec
        self.rounds = rounds
        self.pipeline = pipeline
        self.seed = seed
        self.round = 0  # the round whose global params the party holds (1-based; 0: not started)
        self._global: Published | None = None

    def start(self, params: FlatParams, timeout: float | None = None) -> FlatParams:
        found, final = self._next(1, timeout)
        if final:
            raise GlobalMissingError(f"session {self.ctx.session} in {self.exchange.root} has already ended")
        params.copy_(found.params)
        self.round, self._global = 1, found
        return params

    def sync(
        self,
        params: FlatParams,
        weight: float,
        metrics: dict[str, float] | None = None,
        timeout: float | None = None,
        stats: TrainStats | None = None,
    ) -> bool:
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        if self._global is None:
            raise RuntimeError("sync() before start()")
        delta = params.sub(self._global.params)  # local - global
        update = Update(delta, float(weight), dict(metrics or {}), self.ctx.name, True, stats or NO_STATS)
        if self.pipeline is not None and self.pipeline.client:
            update = self.pipeline.on_party(update, TransformContext(self.round - 1, self.ctx.name, self.seed))
        manifest = {
            "session": self.ctx.session,
            "party": self.ctx.name,
            "round": self.round,
            "kind": "update",
            "weight": float(update.weight),
            "is_delta": True,
            "metrics": {k: float(v) for k, v in update.metrics.items()},
            "stats": update.stats.to_wire(),
            "global_manifest_sha256": self._global.sha256,
        }
        publish(self.exchange.update_dir(self.round, self.ctx.name), update.params, manifest)
        log.info("%s: round %d: published the update of %g examples", self.ctx.name, self.round, update.weight)
        found, final = self._next(self.round + 1, timeout)
        params.copy_(found.params)
        if final:
            return False
        self.round, self._global = self.round + 1, found
        return True

    def close(self) -> None:
        """Nothing to leave: a party that stops publishing is named by the arbiter at its round timeout."""

    def _next(self, rnd: int, timeout: float | None) -> tuple[Published, bool]:
        """Round ``rnd``'s global params, or the session's final ones (True) when those come first."""
        arbiter = {"session": self.ctx.session, "party": ARBITER}
        looks = [
            (self.exchange.global_dir(rnd) / MANIFEST, {**arbiter, "round": rnd, "kind": "global"}),
            (self.exchange.final_dir() / MANIFEST, {**arbiter, "kind": "final"}),
        ]
        wait = self.ctx.timeout if timeout is None else timeout
        found, index = wait_for_first(looks, self.spec, timeout=wait, poll_s=self.ctx.poll_s,
                                      what=f"{self.ctx.name}: round {rnd}'s global params")  # fmt: skip
        return found, index == 1
