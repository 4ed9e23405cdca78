"""Where a population's system traces come from, by name: ``generate`` (seeded synthetic) or ``fedscale``."""

from __future__ import annotations

from collections.abc import Callable

from fedfleet.registry import Registry, construct
from fedfleet.traces.fedscale import load_fedscale_traces
from fedfleet.traces.generate import generate_traces
from fedfleet.traces.system import SystemTraces

TraceSource = Callable[..., SystemTraces]  # (num_clients, seed, **params) -> SystemTraces

TRACE_SOURCES: Registry[TraceSource] = Registry("trace source")
TRACE_SOURCES.add("generate", generate_traces)
TRACE_SOURCES.add("fedscale", load_fedscale_traces)


def build_traces(name: str, num_clients: int, seed: int, **params: object) -> SystemTraces:
    """Traces for ``num_clients`` from the named source; unknown parameters are a ConfigError naming them."""
    source = TRACE_SOURCES.get(name)
    return construct(
        lambda **kw: source(num_clients, seed, **kw), params, f"system.traces {name!r}", signature_of=source, skip=2
    )
