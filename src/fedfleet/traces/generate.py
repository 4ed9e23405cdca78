"""Seeded synthetic traces with the heavy tails measured on real devices.

Compute: seconds per training sample is lognormal, as FedScale models device speed (its
``get_completion_time_lognormal``: mean 5 ms per sample, tail skew 0.6) after the AI-Benchmark spread
of phones that Oort and FedScale report (the slowest devices are ~10x the median).
Network: download and upload bandwidth are lognormal with a wide spread (sigma 1, MobiPerf-like); upload
is correlated with download (the same link) and slower.
Availability: each client has a target online fraction drawn around ``online_fraction``, split into a long
night session (charging, idle, on WiFi, the sessions FedScale's behaviour trace is full of) near the
client's local night plus shorter sessions spread over the day; local night follows the client's time
zone, so the population's online count rises and falls once a day ("diurnal").
Everything is vectorised over the population: 1,000,000 clients take a few seconds.
"""

from __future__ import annotations

import numpy as np

from fedfleet.traces.availability import Availability
from fedfleet.traces.capacity import DeviceCapacity
from fedfleet.traces.errors import TraceError
from fedfleet.traces.system import SystemTraces

DAY = 86_400.0
_CONCENTRATION = 4.0  # Beta(a, b) with a + b = 4: clients differ a lot in how often they are online
_MAX_SESSIONS = 12
_STREAM = 0x7472616365  # 'trace'


def generate_capacity(
    rng: np.random.Generator,
    n: int,
    compute_median_s: float = 0.005,
    compute_sigma: float = 0.6,
    download_median_bps: float = 2.5e6,
    upload_median_bps: float = 1.25e6,
    bandwidth_sigma: float = 1.0,
) -> DeviceCapacity:
    """Lognormal compute (seconds per sample) and bandwidth (bytes/s); medians are the distributions' medians."""
    compute = compute_median_s * np.exp(compute_sigma * rng.standard_normal(n))
    link = rng.standard_normal(n)
    down = download_median_bps * np.exp(bandwidth_sigma * link)
    # the same access link carries both directions: upload shares most of download's draw
    up = upload_median_bps * np.exp(bandwidth_sigma * (0.8 * link + 0.6 * rng.standard_normal(n)))
    return DeviceCapacity(compute, down, up)


def generate_availability(
    rng: np.random.Generator,
    n: int,
    online_fraction: float = 0.3,
    period_s: float = DAY,
    sessions: float = 3.0,
    timezone_spread_h: float = 3.0,
) -> Availability:
    """Each client online ``f_i`` of every period on average (mean of ``f_i`` = ``online_fraction``)."""
    if online_fraction >= 1.0:  # everyone always online: one interval covering the period
        return Availability(np.arange(n + 1, dtype=np.int64), np.zeros(n), np.full(n, period_s), np.full(n, period_s))
    frac = rng.beta(online_fraction * _CONCENTRATION, (1 - online_fraction) * _CONCENTRATION, n)
    count = np.minimum(1 + rng.poisson(max(sessions - 1.0, 0.0), n), _MAX_SESSIONS)
    owner = np.repeat(np.arange(n), count)
    first = np.concatenate(([0], np.cumsum(count)[:-1]))
    m = len(owner)
    # session lengths: exponential shares of the client's online time, the first (night) one weighted up
    on = rng.exponential(1.0, m)
    on[first] *= count
    on *= (frac * period_s)[owner] / _segment_sum(on, first)[owner]
    gap = rng.exponential(1.0, m)
    gap *= ((1 - frac) * period_s)[owner] / _segment_sum(gap, first)[owner]
    # on_0, gap_0, on_1, gap_1, ... from the client's local night, laid out over exactly one period
    step = on + gap
    csum = np.cumsum(step)
    start = csum - step - (csum - step)[first][owner]
    night = 22 * 3600.0 + rng.normal(0.0, 3600.0, n) + rng.normal(0.0, timezone_spread_h * 3600.0, n)
    start = np.mod(start + night[owner], period_s)
    end = start + on
    wrap = end > period_s  # split a session that crosses the end of the period
    starts = np.concatenate((start, np.zeros(int(wrap.sum()))))
    ends = np.concatenate((np.minimum(end, period_s), (end - period_s)[wrap]))
    owners = np.concatenate((owner, owner[wrap]))
    order = np.lexsort((starts, owners))
    starts, ends, owners = starts[order], ends[order], owners[order]
    # the global cumulative sums above round at ~1e-5 s: clip a neighbour's start so intervals stay disjoint
    same = owners[1:] == owners[:-1]
    starts[1:] = np.where(same, np.maximum(starts[1:], ends[:-1]), starts[1:])
    keep = ends > starts
    starts, ends, owners = starts[keep], ends[keep], owners[keep]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owners, minlength=n), out=offsets[1:])
    return Availability(offsets, starts, ends, np.full(n, period_s))


def generate_traces(
    num_clients: int,
    seed: int,
    *,
    compute_median_s: float = 0.005,
    compute_sigma: float = 0.6,
    download_median_bps: float = 2.5e6,
    upload_median_bps: float = 1.25e6,
    bandwidth_sigma: float = 1.0,
    availability: bool = True,
    online_fraction: float = 0.3,
    period_s: float = DAY,
    sessions: float = 3.0,
    timezone_spread_h: float = 3.0,
) -> SystemTraces:
    """Capacity and (unless ``availability`` is false) availability for ``num_clients``, a pure function of ``seed``."""
    what = "system.traces (generate)"
    for name, value in {
        "compute_median_s": compute_median_s,
        "download_median_bps": download_median_bps,
        "upload_median_bps": upload_median_bps,
        "period_s": period_s,
        "sessions": sessions,
    }.items():
        if not value > 0:
            raise TraceError(f"{what}: {name} must be > 0, got {value}")
    for name, value in {"compute_sigma": compute_sigma, "bandwidth_sigma": bandwidth_sigma}.items():
        if not value >= 0:
            raise TraceError(f"{what}: {name} must be >= 0, got {value}")
    if not 0.0 < online_fraction <= 1.0:
        raise TraceError(
            f"{what}: online_fraction must be in (0, 1], got {online_fraction}; with 0 no client is ever online"
        )
    rng = np.random.default_rng([_STREAM, seed])  # its own stream: never correlated with the data partition's
    capacity = generate_capacity(
        rng, num_clients, compute_median_s, compute_sigma, download_median_bps, upload_median_bps, bandwidth_sigma
    )
    avail = None
    if availability:
        avail = generate_availability(rng, num_clients, online_fraction, period_s, sessions, timezone_spread_h)
    return SystemTraces(capacity, avail)


def _segment_sum(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each client's run (every client has at least one element)."""
    return np.add.reduceat(values, first)
