"""The sharded exchange over gRPC: every rank of an FSDP party holds its own stream to the arbiter.

``Context.sharded_channel`` gives each rank a ``ShardedGrpcChannel`` (the ``SyncDriver`` calls every rank's, in
step). Its stream is a ``RankParty``: a ``SyncParty`` whose params are only the rank's boxes, laid out compactly
(``rank_layout.py``), so it receives its rows of each global model and sends its rows of each update, and nothing
else; the arbiter puts the ranks' parts together (``rank_groups.py``). Rank 0 sends the party's weight and
metrics with its part; a replica's boxes are sent by their first holder only. A rank holds one shard-sized buffer
(the inbox: the global it trained from, then the delta from it, then the next global), never the model: its
params are read from and written to its FSDP shards in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.update import TrainStats
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc.chunks import layout_json
from fedfleet.runtime.grpc.links import Outbox
from fedfleet.runtime.grpc.party import Connection
from fedfleet.runtime.grpc.rank_layout import Box, RankLayout, to_wire
from fedfleet.runtime.grpc.sync_party import SyncParty, _sizes
from fedfleet.runtime.grpc.wire import Join, Result, Task, TaskKind


class Shards:
    """A rank's boxes where training keeps them (its FSDP shards' local tensors), in the compact layout's order: what
    a ``RankParty`` syncs, in place of a flat copy."""

    def __init__(self, spec: ParamSpec, pieces: Sequence[Any]) -> None:
        self.spec, self.pieces = spec, list(pieces)


class RankParty(SyncParty):
    """One rank's stream: a ``SyncParty`` over the compact layout of ``boxes`` of ``spec`` (the whole layout)."""

    def __init__(
        self, spec: ParamSpec, boxes: Sequence[Box], written: Sequence[str], rank: int, ranks: int,
        connection: Connection, rounds: int = 0,
    ) -> None:  # fmt: skip
        layout = RankLayout(spec, boxes)
        super().__init__(layout.compact, connection, rounds=rounds)
        self.full_spec, self.boxes, self.rank, self.ranks = spec, layout.boxes, rank, ranks
        self.written = [b[0] for b in layout.boxes if b[0] in set(written)]
        self.write_spec = RankLayout(spec, [b for b in layout.boxes if b[0] in set(self.written)]).compact

    def join_message(self) -> Join:
        join = super().join_message()  # the session's layout is checked as any party's; the boxes say which part
        join.spec_digest = self.full_spec.digest
        join.payload = layout_json(self.full_spec)
        join.rank, join.ranks = self.rank, self.ranks
        join.boxes = to_wire(self.full_spec, self.boxes, set(self.written))
        return join

    def _answer(self, task: Task, params: FlatParams, answer: Any, outbox: Outbox) -> None:
        if self.written:
            super()._answer(task, params, answer, outbox)
        else:  # a second replica: the first holder of its boxes sends them
            self._answered = (task.round, answer)

    def on_task(self, task: Task, outbox: Outbox) -> None:
        if task.task == TaskKind.INIT and not self.written:
            return
        super().on_task(task, outbox)

    def _delta(self, params: Shards | FlatParams) -> FlatParams:
        if isinstance(params, FlatParams):
            return super()._delta(params)
        with torch.no_grad():
            for view, local in self._pairs(params):
                view.mul_(-1.0).add_(local.to(view.device, view.dtype))
        return self.inbox

    def _load(self, params: Shards | FlatParams) -> None:
        if isinstance(params, FlatParams):
            return super()._load(params)
        with torch.no_grad():
            for view, local in self._pairs(params):
                local.copy_(view.to(local.device))
        return None

    def _pairs(self, shards: Shards) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each box's view in the inbox beside the shard that holds it in training."""
        views = self.inbox.tensors()
        return ((views[name], piece.local) for name, piece in zip(self.spec.names, shards.pieces, strict=True))

    def _live_params(self) -> FlatParams:
        live = self._live
        if not isinstance(live, Shards):
            return super()._live_params()
        flat = FlatParams.zeros(self.spec)  # an INIT answer only: the session's first params, once
        with torch.no_grad():
            for view, piece in zip(flat.tensors().values(), live.pieces, strict=True):
                view.copy_(piece.local)
        return flat

    def send_params(self, outbox: Outbox, header: Result, params: FlatParams) -> None:
        """Only the boxes this rank writes (all of its boxes, unless it holds a replica of some)."""
        if self.write_spec != params.spec:
            part = FlatParams.zeros(self.write_spec)
            views = params.tensors()
            for name, view in part.tensors().items():
                view.copy_(views[name])
            params = part
        header = dataclasses.replace(header, spec_digest=self.write_spec.digest, sizes=_sizes(params))
        super().send_params(outbox, header, params)


class ShardedGrpcChannel:
    """One rank's side of an FSDP party's syncs over gRPC (what the ``SyncDriver``'s sharded path calls)."""

    lists_rank_files = False  # each rank sends its own part: rank 0 announces only the weight and metrics

    def __init__(self, connection: Connection, spec: ParamSpec, rounds: int, rank: int, world: int) -> None:
        self.connection, self.spec, self.rounds, self.rank, self.world = connection, spec, rounds, rank, world
        self.party: RankParty | None = None
        self._answer: tuple[float, dict[str, float] | None, TrainStats | None] = (1.0, None, None)

    @property
    def bytes_read(self) -> int:
        return self.party.bytes_received if self.party is not None else 0

    @property
    def bytes_written(self) -> int:
        return self.party.bytes_sent if self.party is not None else 0

    def start(self, pieces: Sequence[Any], timeout: float | None = None) -> None:
        boxes = [_row_box(p) for p in pieces]
        written = [p.name for p in pieces if p.writes]
        self.party = RankParty(self.spec, boxes, written, self.rank, self.world, self.connection, self.rounds)
        self.party.start(Shards(self.party.spec, pieces), timeout)

    def write(self, pieces: Sequence[Any]) -> None:
        """Nothing: the rank's rows are sent from its shards at ``next``, nothing is gathered across ranks."""

    def announce(
        self, written: Sequence[Any], weight: float, metrics: dict[str, float] | None = None,
        stats: TrainStats | None = None,
    ) -> None:  # fmt: skip
        """Rank 0: the party's weight and metrics travel with its own part."""
        if not weight > 0:
            raise ValueError(f"sync weight must be > 0 (examples trained on), got {weight}")
        self._answer = (float(weight), metrics, stats)

    def next(self, pieces: Sequence[Any], timeout: float | None = None) -> bool:
        """Send this rank's part, load its boxes of the next global (True) or of the final params (False)."""
        weight, metrics, stats = self._answer
        return self.party.sync(Shards(self.party.spec, pieces), weight, metrics, timeout, stats=stats)

    def close(self) -> None:
        if self.party is not None:
            self.party.close()


def _row_box(piece: Any) -> Box:
    """A piece's box as rows of its tensor; a box cut along another dim has no contiguous rows to send."""
    first, *rest = piece.box or (slice(0, 1),)
    shape = piece.param.shape
    if any(s.start != 0 or s.stop != n for s, n in zip(rest, shape[1:], strict=True)):
        raise ConfigError(f"{piece.name}: sharded along another dim than 0 ({piece.box}); exchange='gathered'")
    return piece.name, first.start, first.stop - first.start
