"""The clients training right now in an asynchronous run, their held deltas, and their checkpointed form.

A client is trained eagerly when it is dispatched (from the global model of that moment) and its delta is
held in one of ``concurrency`` preallocated slots until its arrival on the virtual clock: server memory is
``concurrency`` deltas, whatever the run's length. Events (an arrival, or a disconnection that loses the
update) pop in virtual-time order; ties go to the client dispatched first, so a run is deterministic.

For checkpoints the slots and one float64 table (a row per slot) live in the loop's ``state`` dict, which
the checkpoint file already carries: a resumed run continues with the same clients in flight.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfleet.core.params import FlatParams
from fedfleet.core.update import NO_STATS, TrainStats

# the table's columns; what a resume keeps of a client's report: its loss stats and the trainer's step count
# (FedBuff refuses q-FedAvg, so no initial loss; the columns are the ones older checkpoints have)
_FIELDS = ("active", "client", "version", "start", "event", "delivers", "examples", "samples", "latency", "seq")
_STATS = ("loss", "loss_sq")
_METRICS = ("steps",)
_COLUMNS = _FIELDS + _STATS + _METRICS
TABLE_KEY = "fedbuff.flights"
SLOT_KEY = "fedbuff.slot.{}"


@dataclass
class Flight:
    client: int
    version: int  # the server version (steps committed) the client trained from
    start: float  # virtual seconds at dispatch
    event: float  # when the server hears of it: start + latency, or when it goes offline
    delivers: bool  # False: it goes offline before it finishes, and nothing arrives
    latency: float  # download + compute + upload, seconds
    samples: float  # samples it trains on (planned from its data size)
    seq: int  # dispatch order: breaks ties between events at the same instant
    examples: float = 0.0  # the update's weight (examples), known once trained
    metrics: dict[str, float] = field(default_factory=dict)
    stats: TrainStats = NO_STATS


class InFlight:
    """``concurrency`` slots: which client is in each, its held delta, and the event queue over them."""

    def __init__(self, like: FlatParams, concurrency: int) -> None:
        self.slots = [like.zeros_like() for _ in range(concurrency)]
        table = torch.zeros(concurrency, len(_COLUMNS), dtype=torch.float64)
        self.table = FlatParams.from_tensors({"flights": table}, device="cpu")
        self.flights: dict[int, Flight] = {}
        self._queue: list[tuple[float, int, int]] = []  # (event time, seq, slot)
        self.seq = 0  # the next dispatch's number

    def __len__(self) -> int:
        return len(self.flights)

    @property
    def free(self) -> int:
        return len(self.slots) - len(self.flights)

    def clients(self) -> np.ndarray:
        """Sorted int64 ids of the clients in flight (a client trains at most once at a time)."""
        return np.sort(np.fromiter((f.client for f in self.flights.values()), dtype=np.int64, count=len(self)))

    def add(self, flight: Flight) -> int:
        """Take a free slot for ``flight``; returns the slot, whose buffer is where its delta goes."""
        slot = next(i for i in range(len(self.slots)) if i not in self.flights)
        self.flights[slot] = flight
        heapq.heappush(self._queue, (flight.event, flight.seq, slot))
        return slot

    def next_event(self) -> float:
        return self._queue[0][0] if self._queue else math.inf

    def pop(self) -> tuple[Flight, FlatParams]:
        """The earliest event's flight and its held delta (valid until the slot is taken again)."""
        _, _, slot = heapq.heappop(self._queue)
        return self.flights.pop(slot), self.slots[slot]

    def state(self) -> dict[str, FlatParams]:
        return {TABLE_KEY: self.table, **{SLOT_KEY.format(i): s for i, s in enumerate(self.slots)}}

    # -- checkpoint form ----------------------------------------------------------------------------
    def write_table(self, empty: bool = False) -> None:
        """Fill the table from the flights (before a snapshot); ``empty``: as if none were in flight."""
        rows = torch.zeros_like(self.table.buffers[torch.float64]).view(len(self.slots), len(_COLUMNS))
        for slot, f in () if empty else self.flights.items():
            values = [1.0, f.client, f.version, f.start, f.event, f.delivers, f.examples, f.samples, f.latency, f.seq]
            values += [_nan(getattr(f.stats, k)) for k in _STATS] + [f.metrics.get(k, math.nan) for k in _METRICS]
            rows[slot] = torch.tensor(values, dtype=torch.float64)
        self.table.buffers[torch.float64].copy_(rows.view(-1))

    def read_table(self) -> None:
        """Rebuild the flights and the event queue from the table (after a restore filled it and the slots)."""
        rows = self.table.buffers[torch.float64].view(len(self.slots), len(_COLUMNS)).tolist()
        self.flights, self._queue = {}, []
        for slot, row in enumerate(rows):
            v = dict(zip(_COLUMNS, row, strict=True))
            if not v["active"]:
                continue
            metrics = {k: v[k] for k in _METRICS if not math.isnan(v[k])}
            stats = TrainStats(samples=v["samples"], **{k: None if math.isnan(v[k]) else v[k] for k in _STATS})
            flight = Flight(
                int(v["client"]), int(v["version"]), v["start"], v["event"], bool(v["delivers"]),
                v["latency"], v["samples"], int(v["seq"]), v["examples"], metrics, stats,
            )  # fmt: skip
            self.flights[slot] = flight
            heapq.heappush(self._queue, (flight.event, flight.seq, slot))
        self.seq = 1 + max((f.seq for f in self.flights.values()), default=-1)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
