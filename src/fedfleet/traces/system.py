"""A population's system traces: device capacity for every client, and optionally when each is online."""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.traces.availability import Availability
from fedfleet.traces.capacity import DeviceCapacity
from fedfleet.traces.errors import TraceError


@dataclass(frozen=True, eq=False)
class SystemTraces:
    capacity: DeviceCapacity
    availability: Availability | None = None  # None: every client is always online

    def __post_init__(self) -> None:
        if self.availability is not None and self.availability.num_clients != len(self.capacity):
            raise TraceError(
                f"the capacity trace covers {len(self.capacity)} clients but the availability trace "
                f"{self.availability.num_clients}; build both for the same population"
            )

    @property
    def num_clients(self) -> int:
        return len(self.capacity)

    @property
    def nbytes(self) -> int:
        return self.capacity.nbytes + (self.availability.nbytes if self.availability is not None else 0)
