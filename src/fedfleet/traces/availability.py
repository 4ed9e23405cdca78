"""When each client is online, stored CSR-style: client i's intervals are ``starts/ends[offsets[i]:offsets[i+1]]``.

Times are seconds within the client's ``period``; the trace repeats after it (FedScale's ``finish_time``),
so a one-week trace serves a simulation of any length. An interval is closed: a client is online at
``t`` when ``start <= t mod period <= end``, as in FedScale's ``is_active``.

Why CSR: 1,000,000 clients with three sessions each cost ~56 MB (two float64 arrays of 3M, offsets and
periods), and "who is online now" is a handful of vectorised passes over those arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedfleet.traces.errors import TraceError


@dataclass(frozen=True, eq=False)
class Availability:
    offsets: np.ndarray  # (n + 1,) int64, offsets[0] == 0, non-decreasing
    starts: np.ndarray  # (m,) float64 seconds in [0, period]
    ends: np.ndarray  # (m,) float64, sorted and disjoint within a client
    period: np.ndarray  # (n,) float64 seconds after which the client's trace repeats

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.starts.nbytes + self.ends.nbytes + self.period.nbytes

    # -- queries over the whole population (vectorised, no Python loop over clients) ----------------
    def online_at(self, t: float) -> np.ndarray:
        """(n,) bool: is each client online at virtual time ``t``."""
        online = np.zeros(self.num_clients, dtype=bool)
        online[self._owner[self._hits(t)]] = True
        return online

    def online_clients(self, t: float) -> np.ndarray:
        """Sorted int64 indices of the clients online at ``t``."""
        owners = self._owner[self._hits(t)]  # sorted: intervals are stored client by client
        first = np.ones(len(owners), dtype=bool)
        np.not_equal(owners[1:], owners[:-1], out=first[1:])  # two touching intervals may both hold t
        return owners[first].astype(np.int64)

    def _hits(self, t: float) -> np.ndarray:
        """Boolean mask of the intervals that contain ``t`` (in each client's own period)."""
        period = self._common_period
        x = t % period if period is not None else np.mod(t, self.period)[self._owner]  # scalar when shared
        return (self.starts <= x) & (x <= self.ends)

    @cached_property
    def _owner(self) -> np.ndarray:
        """The client of each interval (int32: 4 bytes an interval)."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int32), np.diff(self.offsets))

    @cached_property
    def _common_period(self) -> float | None:
        p = self.period
        return float(p[0]) if len(p) and bool((p == p[0]).all()) else None

    def next_check_in(self, t: float) -> float:
        """The earliest time >= ``t`` at which some client is online (``t`` itself if one is online now)."""
        if self.online_at(t).any():
            return float(t)
        period = np.repeat(self.period, np.diff(self.offsets))
        local = np.mod(t, period)
        wait = np.where(self.starts >= local, self.starts - local, self.starts + period - local)
        if len(wait) == 0:
            raise TraceError("no client is ever online: the availability trace has no intervals")
        return float(t + wait.min())

    def online_fraction(self) -> float:
        """Mean over clients of the fraction of its period it is online."""
        online = self._per_client_sum(self.ends - self.starts)
        return float(np.mean(online / self.period)) if self.num_clients else 0.0

    # -- queries about a few clients (the cohort) ----------------------------------------------------
    def time_left(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Seconds each client stays online from ``t`` (0 if offline at ``t``, inf if never offline).

        A session that runs to the end of the period and continues at its start (the trace wraps) counts as
        one session. A Python loop over the cohort only: k clients, each a binary search in its own intervals.
        """
        out = np.zeros(len(clients), dtype=np.float64)
        for row, c in enumerate(np.asarray(clients, dtype=np.int64)):
            lo, hi = int(self.offsets[c]), int(self.offsets[c + 1])
            starts, ends, period = self.starts[lo:hi], self.ends[lo:hi], float(self.period[c])
            x = t % period
            j = int(np.searchsorted(starts, x, side="right")) - 1
            if j < 0 or x > ends[j]:
                continue
            left = float(ends[j]) - x
            wraps = ends[j] >= period and starts[0] <= 0.0
            if wraps and hi - lo == 1:
                left = float("inf")  # one interval covering the whole period: always online
            elif wraps:
                left += float(ends[0])  # the session goes on into the next period's first interval
            out[row] = left
        return out

    def _per_client_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of a per-interval array over each client's intervals (empty clients give 0)."""
        cs = np.concatenate(([0], np.cumsum(values)))
        return cs[self.offsets[1:]] - cs[self.offsets[:-1]]

    # -- validation ------------------------------------------------------------------------------
    def check(self, source: str, ids: Sequence[object] | None = None) -> Availability:
        """Raise a :class:`TraceError` naming ``source``, the first bad client and the fix; returns ``self``."""
        n, m = self.num_clients, len(self.starts)

        def who(i: int) -> str:
            return f"client {i}" if ids is None else f"client {ids[i]}"

        def owner(j: int) -> int:
            return int(np.searchsorted(self.offsets, j, side="right")) - 1

        if self.offsets.ndim != 1 or n < 0 or self.offsets[0] != 0 or self.offsets[-1] != m:
            raise TraceError(f"{source}: offsets must start at 0 and end at the number of intervals ({m})")
        if (np.diff(self.offsets) < 0).any() or len(self.ends) != m or len(self.period) != n:
            raise TraceError(f"{source}: offsets, starts, ends and period disagree in length or order")
        bad = ~np.isfinite(self.period) | (self.period <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise TraceError(f"{source}: {who(i)} has a trace period of {self.period[i]} s; it must be > 0")
        period = np.repeat(self.period, np.diff(self.offsets))
        problems = [
            (~np.isfinite(self.starts) | ~np.isfinite(self.ends), "has a non-finite interval bound", "fix the value"),
            (self.ends < self.starts, "has an interval that ends before it starts", "swap or drop it"),
            (self.starts < 0, "has an interval starting before 0", "times are seconds from the trace start"),
            (self.ends > period, "has an interval ending after its trace period", "raise finish_time or clip it"),
        ]
        for mask, what, fix in problems:
            if mask.any():
                j = int(np.argmax(mask))
                i = owner(j)
                raise TraceError(
                    f"{source}: {who(i)} {what} ([{self.starts[j]}, {self.ends[j]}], period {self.period[i]}); {fix}"
                )
        same = np.ones(max(m - 1, 0), dtype=bool)
        same[self.offsets[1:-1][(self.offsets[1:-1] > 0) & (self.offsets[1:-1] < m)] - 1] = False
        unsorted = same & (self.starts[1:] < self.starts[:-1])
        overlap = same & (self.starts[1:] < self.ends[:-1])
        for mask, what in ((unsorted, "unsorted"), (overlap, "overlapping")):
            if mask.any():
                j = int(np.argmax(mask))
                raise TraceError(
                    f"{source}: {who(owner(j))} has {what} intervals ([{self.starts[j]}, {self.ends[j]}] then "
                    f"[{self.starts[j + 1]}, {self.ends[j + 1]}]); sort each client's intervals by start and merge "
                    f"overlapping ones"
                )
        if n and not (self.ends > self.starts).any():
            raise TraceError(
                f"{source}: no client is ever online, so no round could run; check the trace (or drop "
                f"the availability trace to keep every client online)"
            )
        return self
