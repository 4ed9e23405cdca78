"""The virtual clock: what a round would have taken on the clients' devices and networks.

Client latency = download of the global params + local compute (samples x seconds per sample) + upload of
the actual update. A synchronous round lasts as long as its slowest client. The default profile is one
mid-range phone on a 20/10 Mbit/s link; trace-driven per-client profiles plug in through ``profile_of``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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
    def __init__(self, profile_of: Callable[[int | str], DeviceProfile] | None = None) -> None:
        default = DeviceProfile()
        self.profile_of = profile_of or (lambda _cid: default)
        self.now = 0.0

    def client_latency(self, client_id: int | str, samples: float, download_bytes: int, upload_bytes: int) -> float:
        return self.profile_of(client_id).latency(samples, download_bytes, upload_bytes)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
