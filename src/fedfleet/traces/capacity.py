"""Per-client device capacity, stored columnar: one float64 array per field.

Why columnar: 1,000,000 clients cost 24 MB (three arrays) instead of a million Python dicts (~1 GB), and
the latency of a whole cohort is one vectorised expression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedfleet.traces.errors import TraceError


@dataclass(frozen=True, eq=False)
class DeviceCapacity:
    """Client i trains one sample in ``seconds_per_sample[i]`` and moves bytes at the given rates."""

    seconds_per_sample: np.ndarray  # (n,) float64, forward + backward of one sample
    download_bytes_per_s: np.ndarray  # (n,) float64
    upload_bytes_per_s: np.ndarray  # (n,) float64

    def __len__(self) -> int:
        return len(self.seconds_per_sample)

    @property
    def nbytes(self) -> int:
        return self.seconds_per_sample.nbytes + self.download_bytes_per_s.nbytes + self.upload_bytes_per_s.nbytes

    def latency(
        self, clients: np.ndarray, samples: np.ndarray | float, download_bytes: float, upload_bytes: float
    ) -> np.ndarray:
        """Seconds for each client: download + samples x seconds per sample + upload (float64, like ``clients``)."""
        return (
            download_bytes / self.download_bytes_per_s[clients]
            + np.asarray(samples, dtype=np.float64) * self.seconds_per_sample[clients]
            + upload_bytes / self.upload_bytes_per_s[clients]
        )

    def check(self, source: str, ids: Sequence[object] | None = None) -> DeviceCapacity:
        """Raise a :class:`TraceError` naming ``source`` and the first bad client; returns ``self``."""
        fields = {
            "seconds per sample": (self.seconds_per_sample, False),
            "download bytes/s": (self.download_bytes_per_s, True),
            "upload bytes/s": (self.upload_bytes_per_s, True),
        }
        n = len(self.seconds_per_sample)
        for name, (values, positive) in fields.items():
            if values.ndim != 1 or len(values) != n:
                raise TraceError(f"{source}: {name} has shape {values.shape}, expected ({n},)")
            bad = ~np.isfinite(values) | (values <= 0 if positive else values < 0)
            if bad.any():
                i = int(np.argmax(bad))
                who = f"client {i}" if ids is None else f"client {ids[i]}"
                raise TraceError(
                    f"{source}: {who} has {name} = {values[i]}; speeds must be finite and "
                    f"{'> 0' if positive else '>= 0'}: fix or drop that client's entry"
                )
        return self
