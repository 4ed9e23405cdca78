"""The file runtime's arbiter side: the round loop's ``fit`` over an exchange folder instead of a network.

For sites whose compute nodes have no network: ``fit`` publishes the round's global params with one task per
selected party (its training config and seed, the simulated client's), then polls for the parties' update
manifests until ``round_timeout``. Each manifest found is verified (``exchange.verify``: the session, the party
of its folder, the round, the global it trained from, every file's size and SHA-256, the layout, finite values and
weight) and its update is yielded to the loop, which folds it like any other runtime's; one that fails is refused
with the reason naming the file, counted and logged, never folded. A party that has published nothing by the
timeout is named. The same strategies, pipeline and checkpoints work, since the loop is the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import RoundIncomplete
from fedfleet.core.params import FlatParams
from fedfleet.core.update import TrainStats, Update
from fedfleet.runtime.files.exchange import (
    MANIFEST,
    Exchange,
    Refused,
    file_sum,
    finite_weight,
    metrics_of,
    poll_delays,
    prune,
    publish,
    read_manifest,
    verify,
)
from fedfleet.runtime.sim.sequential import client_seed

log = logging.getLogger("fedfleet.arbiter")

ARBITER = "arbiter"
# global params are published with a SHA-256 per block of this many bytes: an FSDP party's rank reads and checks
# only the blocks holding its shard (slices.py), at the cost of hashing the global twice as it is written. A rank
# reads up to a block too many at either end of its rows of each tensor: 1 MiB keeps that small beside the shards
# of a large model (benchmarks/fsdp_sharded_exchange.py: 4 MiB blocks read the whole of 4 MiB tensors)
BLOCK_BYTES = 1 << 20
# the largest |value| x weight an update may bring to the running sum (float32 ends at 3.4e38), as over gRPC
MAX_WEIGHTED_MAGNITUDE = 1e32


class FileRuntime:
    virtual_clock = False  # real sites, real batch queues: rounds take wall time only

    def __init__(
        self,
        exchange: str | Path | Exchange,
        *,
        session: str,
        parties: Sequence[str],
        min_parties: int,
        round_timeout: float,
        poll_s: float = 1.0,
        keep_last: int | None = None,
        evaluator: Any = None,
        max_weight: float = 1.0e9,
        max_update_norm: float | None = None,
        shard_bytes: int | None = None,
        block_bytes: int | None = BLOCK_BYTES,
    ) -> None:
        """``parties``: the session's parties, client ``k`` of the loop being ``parties[k]``. ``keep_last``: after
        publishing a round, remove the files this runtime's manifests list of rounds older than the last
        ``keep_last`` (None: keep everything). ``evaluator``: a central (trainer, test data) pair, or None. An update
        claiming a weight over ``max_weight``, or a delta longer (L2) than ``max_update_norm``, is refused.
        ``shard_bytes``: the global params are written as safetensors shards of at most this size (None: one file);
        ``block_bytes``: their manifest lists a SHA-256 per block of this size, for ranks that read only their
        shard (None: none, and a sharded party is refused)."""
        self.exchange = exchange if isinstance(exchange, Exchange) else Exchange(exchange)
        self.session = session
        self.parties = list(parties)
        for name in self.parties:
            self.exchange.update_dir(1, name)  # a name that cannot be a folder is refused here, not mid-run
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.index = {name: k for k, name in enumerate(self.parties)}
        self.min_parties = min_parties
        self.round_timeout = round_timeout
        self.poll_s = poll_s
        self.keep_last = keep_last
        self.evaluator = evaluator
        self.max_weight = max_weight
        self.max_update_norm = max_update_norm
        self.shard_bytes = shard_bytes
        self.block_bytes = block_bytes
        self.refusals: list[str] = []  # every refusal of the session, for whoever asks why
        self._metrics: dict[str, float] = {}

    @property
    def population(self) -> int:
        return len(self.parties)

    # -- Runtime protocol --------------------------------------------------------------------------
    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]:
        rnd = config.round + 1
        names = [self.parties[int(c)] for c in clients]
        tasks = {
            name: dataclasses.asdict(dataclasses.replace(config, seed=client_seed(config, self.index[name])))
            for name in names
        }
        global_sum = self.publish_global(rnd, global_params, tasks)
        if self.keep_last is not None:
            prune(self.exchange, self.keep_last, rnd)
        spec = global_params.spec
        pending, accepted, refused, lost = set(names), 0, 0, 0
        deadline = time.monotonic() + self.round_timeout
        delays = poll_delays(self.poll_s)
        while pending:
            self.fetch(rnd, pending)
            for name in sorted(pending):
                path = self.exchange.update_dir(rnd, name) / MANIFEST
                expect = {"session": self.session, "party": name, "round": rnd, "kind": "update"}
                try:
                    found = verify(path, expect, spec)
                    if found is None:
                        continue  # no manifest yet: its files, if any, are not looked at
                    if found.manifest.get("global_manifest_sha256") != global_sum:
                        raise Refused(f"{path}: trained from another global model than round {rnd}'s")
                    update = Update(
                        found.params,
                        finite_weight(found.manifest, path),
                        metrics_of(found.manifest, path),
                        client_id=self.index[name],
                        is_delta=self._is_delta(found.manifest, path),
                        stats=self._stats(found.manifest, path),
                    )
                    self._check_bounds(update, path)
                except Refused as exc:
                    pending.discard(name)
                    refused += 1
                    self.refusals.append(str(exc))
                    log.warning("round %d: refused the update of %s: %s", rnd, name, exc)
                    continue
                pending.discard(name)
                accepted += 1
                yield update
            if not pending or time.monotonic() >= deadline:
                break
            gone = self.gone(rnd, pending)
            for name, why in gone.items():
                pending.discard(name)
                log.warning("round %d: no update will come from %s: %s", rnd, name, why)
            lost += len(gone)
            if gone and accepted + len(pending) < self.min_parties:
                self.round_lost(rnd, gone)
            time.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
        self._metrics = {
            "parties": float(len(names)),
            "timed_out": float(len(pending)),
            "rejected": float(refused),
            **({"lost": float(lost)} if lost else {}),
        }
        if pending:
            log.warning(
                "round %d closed at the timeout (%g s) without an update from %s", rnd, self.round_timeout,
                ", ".join(sorted(pending)),
            )  # fmt: skip
        if accepted < self.min_parties:
            late = f"; no update from {', '.join(sorted(pending))}" if pending else ""
            raise RoundIncomplete(
                f"round {rnd}: {accepted} good update(s), fewer than min_parties={self.min_parties} (refused "
                f"{refused}, timed out {len(pending)}{late}) in {self.exchange.round_dir(rnd)}"
            )

    def fetch(self, rnd: int, pending: set[str]) -> None:
        """Before each look at the folder: bring in what pending parties published elsewhere (a site's copy of
        the exchange, over SSH). Nothing by default: the folder is shared."""

    def publish_final(self, params: FlatParams) -> Path:
        """The session's final global params, for parties that sync at their own points (``FileContext``): their
        last sync loads them. Returns the manifest's path."""
        manifest = {"session": self.session, "party": ARBITER, "round": 0, "kind": "final"}
        publish(self.exchange.final_dir(), params, manifest, self.shard_bytes, self.block_bytes)
        return self.exchange.final_dir() / MANIFEST

    def gone(self, rnd: int, pending: set[str]) -> dict[str, str]:
        """The pending parties whose update will not come this round, and why (a site's batch job that ended
        without publishing one); checked between polls. A folder alone cannot tell: none by default."""
        return {}

    def round_lost(self, rnd: int, gone: dict[str, str]) -> None:
        """Too few parties are left for ``min_parties``: by default the round is run again (the loop's retry)."""
        raise RoundIncomplete(
            f"round {rnd}: fewer than min_parties={self.min_parties} updates can come: "
            + "; ".join(f"{name}: {why}" for name, why in gone.items())
        )

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        trainer, data = self.evaluator
        return dict(trainer.evaluate(global_params, data))

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- internals ---------------------------------------------------------------------------------
    def publish_global(self, rnd: int, params: FlatParams, tasks: dict[str, dict]) -> str:
        """Publish round ``rnd``'s global params and tasks; returns the manifest's SHA-256 (what updates name). A
        round run again (the loop's retry, a resumed run) with the same params and tasks keeps the published files,
        so updates parties already made from them still count."""
        folder = self.exchange.global_dir(rnd)
        manifest = {"session": self.session, "party": ARBITER, "round": rnd, "kind": "global", "tasks": tasks}
        try:
            old = read_manifest(folder / MANIFEST)
        except Refused:
            old = None
        if old is not None and all(old.get(k) == v for k, v in manifest.items()):
            try:
                published = verify(folder / MANIFEST, {"kind": "global"}, params.spec)
            except Refused:
                published = None
            if published is not None and published.params.allclose(params, rtol=0, atol=0):
                return published.sha256
        publish(folder, params, manifest, self.shard_bytes, self.block_bytes)
        return file_sum(folder / MANIFEST)[0]

    def _check_bounds(self, update: Update, path: Path) -> None:
        """The weight within ``max_weight``; values that cannot overflow the running sum once weighted; a delta's
        norm within ``max_update_norm``."""
        if update.weight > self.max_weight:
            raise Refused(f"{path}: weight {update.weight:g} over the limit {self.max_weight:g} (network.max_weight)")
        top = update.params.max_abs()
        if top * update.weight > MAX_WEIGHTED_MAGNITUDE:
            raise Refused(f"{path}: values up to {top:.3g} with weight {update.weight:g} would overflow the sum")
        if self.max_update_norm is not None and update.is_delta:
            norm = math.sqrt(update.params.sq_norm())
            if norm > self.max_update_norm:
                raise Refused(f"{path}: an update of L2 norm {norm:.4g}, over max_update_norm={self.max_update_norm:g}")

    @staticmethod
    def _is_delta(body: dict[str, Any], path: Path) -> bool:
        value = body.get("is_delta", True)
        if not isinstance(value, bool):
            raise Refused(f"{path}: is_delta is {value!r}, not true or false")
        return value

    @staticmethod
    def _stats(body: dict[str, Any], path: Path) -> TrainStats:
        try:
            stats = TrainStats.from_wire(body.get("stats", {}))
        except (TypeError, ValueError) as exc:
            raise Refused(f"{path}: stats: {exc}") from None
        if (why := stats.check()) is not None:
            raise Refused(f"{path}: stats: {why}")
        return stats
