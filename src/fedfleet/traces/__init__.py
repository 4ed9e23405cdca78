"""System traces for simulation: per-client device capacity and availability, columnar (numpy arrays)."""

from fedfleet.traces.availability import Availability
from fedfleet.traces.capacity import DeviceCapacity
from fedfleet.traces.errors import TraceError
from fedfleet.traces.fedscale import load_fedscale_availability, load_fedscale_capacity, load_fedscale_traces
from fedfleet.traces.generate import generate_traces
from fedfleet.traces.sources import TRACE_SOURCES, build_traces
from fedfleet.traces.system import SystemTraces

__all__ = [
    "TRACE_SOURCES",
    "Availability",
    "DeviceCapacity",
    "SystemTraces",
    "TraceError",
    "build_traces",
    "generate_traces",
    "load_fedscale_availability",
    "load_fedscale_capacity",
    "load_fedscale_traces",
]
