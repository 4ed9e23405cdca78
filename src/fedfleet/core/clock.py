"""The virtual clock: what a round would have taken on the clients' devices and networks.

Client latency = download of the global params + local compute (samples x seconds per sample) + upload of
the actual update. The default profile is one mid-range phone on a 20/10 Mbit/s link, the same for every
client; with system traces (``fedfleet.traces``) each client has its own capacity and, optionally, an
availability trace: it is online only in its intervals, and a client that goes offline before it finishes
loses its update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedfleet.core.fit_config import FitConfig
from fedfleet.traces.system import SystemTraces


@dataclass(frozen=True)
class DeviceProfile:
    seconds_per_sample: float = 0.002
    download_bytes_per_s: float = 2.5e6
    upload_bytes_per_s: float = 1.25e6

    def latency(self, samples: float, download_bytes: int, upload_bytes: int) -> float:
        return (
            download_bytes / self.download_bytes_per_s
            + samples * self.seconds_per_sample
            + upload_bytes / self.upload_bytes_per_s
        )


class VirtualClock:
    """Simulated seconds since the run started (``now``), and each client's latency and availability.

    ``profile_of`` gives any client id a :class:`DeviceProfile`; ``traces`` (for integer client ids
    ``0..n-1``) replace it with per-client capacity and availability.
    """

    def __init__(
        self, profile_of: Callable[[int | str], DeviceProfile] | None = None, traces: SystemTraces | None = None
    ) -> None:
        default = DeviceProfile()
        self.traces = traces
        if traces is not None:
            cap = traces.capacity
            profile_of = profile_of or (
                lambda cid: DeviceProfile(
                    float(cap.seconds_per_sample[int(cid)]),
                    float(cap.download_bytes_per_s[int(cid)]),
                    float(cap.upload_bytes_per_s[int(cid)]),
                )
            )
        self.profile_of = profile_of or (lambda _cid: default)
        self.now = 0.0

    def client_latency(self, client_id: int | str, samples: float, download_bytes: int, upload_bytes: int) -> float:
        return self.profile_of(client_id).latency(samples, download_bytes, upload_bytes)

    def latencies(self, clients: np.ndarray, samples: np.ndarray, download_bytes: int, upload_bytes: int) -> np.ndarray:
        """Seconds for each of ``clients`` (float64): vectorised over the traces, one call per client otherwise."""
        clients = np.asarray(clients, dtype=np.int64)
        if self.traces is not None:
            return self.traces.capacity.latency(clients, samples, download_bytes, upload_bytes)
        return np.array(
            [
                self.client_latency(int(c), float(s), download_bytes, upload_bytes)
                for c, s in zip(clients, samples, strict=True)
            ],
            dtype=np.float64,
        )

    def online_clients(self, at: float | None = None) -> np.ndarray | None:
        """Sorted indices of the clients online at ``at`` (default now); ``None`` without an availability trace."""
        if self.traces is None or self.traces.availability is None:
            return None
        return self.traces.availability.online_clients(self.now if at is None else at)

    def time_online(self, clients: np.ndarray, at: float | None = None) -> np.ndarray:
        """Seconds each client stays online from ``at`` (default now); inf without an availability trace."""
        if self.traces is None or self.traces.availability is None:
            return np.full(len(clients), np.inf)
        return self.traces.availability.time_left(clients, self.now if at is None else at)

    def next_check_in(self, at: float | None = None) -> float:
        """The earliest time >= ``at`` (default now) at which some client is online."""
        at = self.now if at is None else at
        if self.traces is None or self.traces.availability is None:
            return at
        return self.traces.availability.next_check_in(at)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def planned_samples(sizes: np.ndarray, config: FitConfig) -> np.ndarray:
    """Samples each client will train on, known before training: what the trainers report as ``samples``.

    ``epochs`` passes see every example ``epochs`` times; ``steps`` batches cycle over the shuffled data
    (``ceil(n / batch)`` batches a pass, the last one short), as ``client.torch_trainer.batch_indices`` does.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if config.steps is None:
        return (sizes * config.epochs).astype(np.float64)
    bs = config.batch_size
    per_pass = np.maximum(-(-sizes // bs), 1)
    full, rest = np.divmod(config.steps, per_pass)
    return np.where(sizes > 0, full * sizes + rest * bs, 0).astype(np.float64)
