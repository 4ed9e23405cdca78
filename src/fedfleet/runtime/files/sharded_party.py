"""The sharded exchange through the folder: every rank of an FSDP party reads and writes only its own boxes.

``FileContext.sharded_channel`` gives each rank one of these (the ``SyncDriver`` calls every rank's, in step):

- ``start`` / ``next``: the rank waits for round k's global manifest (or the session's final one) and reads only
  its boxes of it, each block checked against the manifest's block sums (``slices.py``): no rank reads, holds or
  gathers the whole model;
- ``write``: the rank writes its boxes of the update (its shard of the delta from the global it read) as one
  file, ``rank-00003.safetensors``, into the party's update folder; a box held by several replicas (hybrid
  sharding) is written by the first only;
- ``announce``: rank 0 alone, once every rank has written, publishes the manifest that lists all the files and
  their boxes (``boxes.py``): the arbiter assembles the update by name and offset and folds it as any other.

The collectives (who waits for whom, one rank's failure raised on all) are the driver's, not this module's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from fedfleet.core.params import ParamSpec
from fedfleet.core.update import NO_STATS, TrainStats
from fedfleet.runtime.files.boxes import publish_box_manifest, write_box_file
from fedfleet.runtime.files.exchange import MANIFEST, Exchange
from fedfleet.runtime.files.party import GlobalMissingError, wait_for_first
from fedfleet.runtime.files.runtime import ARBITER
from fedfleet.runtime.files.slices import Slices, read_slices

log = logging.getLogger("fedfleet.party")


class ShardedFileChannel:
    """One rank's side of a party's syncs through the folder (``ctx``: the party's ``FileContext``)."""

    lists_rank_files = True  # rank 0's announce needs every rank's ``write`` (the driver gathers them)

    def __init__(self, ctx: Any, spec: ParamSpec, rounds: int, rank: int) -> None:
        self.ctx = ctx
        self.exchange = Exchange(ctx.exchange)
        self.exchange.update_dir(1, ctx.name)  # a name that cannot be a folder is refused before any training
        self.spec, self.rounds, self.rank = spec, rounds, rank
        self.round = 0  # the round whose global boxes this rank holds (1-based; 0: not started)
        self.global_sha = ""
        self.bytes_read = 0  # of published files, by this rank: its shard and the blocks' edges
        self.bytes_written = 0
        self._global: dict[str, torch.Tensor] = {}  # this rank's boxes of the global it trained from

    def start(self, pieces: Sequence[Any], timeout: float | None = None) -> None:
        found, final = self._next(1, pieces, timeout)
        if final:
            raise GlobalMissingError(f"session {self.ctx.session} in {self.exchange.root} has already ended")
        self._load(found, pieces)
        self.round = 1

    def write(self, pieces: Sequence[Any]) -> dict[str, Any] | None:
        """This rank's boxes of the update as its own file; None when it writes none (a second replica)."""
        if self.round == 0:
            raise RuntimeError("write() before start()")
        mine = []
        with torch.no_grad():
            for p in pieces:
                if p.writes:  # the delta in place of the global's copy: no second shard-sized buffer (next reloads)
                    delta = self._global.pop(p.name).neg_().add_(p.local.float())
                    mine.append((p.name, p.offsets, delta.to(p.local.dtype)))
        if not mine:
            return None
        written = write_box_file(self._folder(), f"rank-{self.rank:05d}.safetensors", mine)
        self.bytes_written += written["bytes"]
        return written

    def announce(
        self, written: Sequence[dict[str, Any] | None], weight: float, metrics: dict[str, float] | None = None,
        stats: TrainStats | None = None,
    ) -> None:  # fmt: skip
        """Rank 0: the update's manifest, listing every rank's file, once they are all written."""
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        manifest = {
            "session": self.ctx.session,
            "party": self.ctx.name,
            "round": self.round,
            "kind": "update",
            "weight": float(weight),
            "is_delta": True,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "stats": (stats or NO_STATS).to_wire(),
            "global_manifest_sha256": self.global_sha,
        }
        files = [w for w in written if w is not None]
        publish_box_manifest(self._folder(), files, self.spec, manifest)
        log.info("%s: round %d: published the update of %g examples in %d rank files", self.ctx.name, self.round,
                 weight, len(files))  # fmt: skip

    def next(self, pieces: Sequence[Any], timeout: float | None = None) -> bool:
        """Load this rank's boxes of the next round's global (True) or of the session's final params (False)."""
        found, final = self._next(self.round + 1, pieces, timeout)
        self._load(found, pieces)
        if final:
            return False
        self.round += 1
        return True

    def close(self) -> None:
        """Nothing to leave: a party that stops publishing is named by the arbiter at its round timeout."""

    # -- internals -----------------------------------------------------------------------------------
    def _folder(self):
        return self.exchange.update_dir(self.round, self.ctx.name)

    def _load(self, found: Slices, pieces: Sequence[Any]) -> None:
        with torch.no_grad():
            for piece in pieces:
                values = found.tensors[piece.name]
                piece.local.copy_(values.to(piece.local.device))
                self._global[piece.name] = values.float()
        self.global_sha = found.sha256
        self.bytes_read += found.bytes_read

    def _next(self, rnd: int, pieces: Sequence[Any], timeout: float | None) -> tuple[Slices, bool]:
        arbiter = {"session": self.ctx.session, "party": ARBITER}
        looks = [
            (self.exchange.global_dir(rnd) / MANIFEST, {**arbiter, "round": rnd, "kind": "global"}),
            (self.exchange.final_dir() / MANIFEST, {**arbiter, "kind": "final"}),
        ]
        boxes = {p.name: p.box for p in pieces}

        def read(path, expect, spec):
            return read_slices(path, expect, spec, boxes)

        wait = self.ctx.timeout if timeout is None else timeout
        what = f"{self.ctx.name} rank {self.rank}: round {rnd}'s global params"
        found, index = wait_for_first(looks, self.spec, timeout=wait, poll_s=self.ctx.poll_s, read=read, what=what)
        return found, index == 1
