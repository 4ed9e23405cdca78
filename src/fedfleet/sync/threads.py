"""How many torch threads a party trains with on a CPU: the simulation's rule, for HF and Lightning parties too.

Why: a small model's ops are too short for torch's intra-op threads to share, and whenever another process (or
another party) holds a core, its threads spin-wait on each other. Two tiny GPT-2 parties and an arbiter over
gRPC on 2 cores, each party with torch's default of one thread per core, trained 4.7-12x slower than with one
thread each (Lightning parties 3.5-10x); in-process parties, which take turns, 1.1-1.3x (benchmarks/party_threads.py
and benchmarks/RESULTS.md; the simulation's own figures: benchmarks/threads.py). So, on a CPU:

- a model under ``ONE_THREAD_BELOW`` params trains with 1 thread;
- a larger one keeps torch's threads, shared out when in-process parties train at once (``reproducible=False``);
- ``threads=N`` (``FedAvgClient``, ``FedLightningCallback``) or ``OMP_NUM_THREADS`` in the environment wins.

The rule is fixed (model size and federation shape), never read from the machine's load: torch's reductions sum in
a thread-count-dependent order, so a count chosen from the load would make a seeded run depend on what else ran.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from fedfleet.errors import ConfigError
from fedfleet.sync.local import LocalContext

log = logging.getLogger("fedfleet.sync")

# the simulation's threshold (fedfleet.jobs.assemble.ONE_THREAD_BELOW, measured in benchmarks/threads.py); a test
# keeps the two equal
ONE_THREAD_BELOW = 10_000_000


def choose_threads(params: int, device: torch.device, at_once: int = 1, threads: int | None = None) -> int | None:
    """The torch threads for a party training ``params`` params on ``device`` beside ``at_once - 1`` other
    in-process parties training at the same time; None: leave torch's setting as it is."""
    if threads is not None:
        return check_threads(threads)
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    if params < ONE_THREAD_BELOW:
        return 1
    if at_once > 1:  # each party thread would start a pool of its own: share the cores instead
        return max(1, torch.get_num_threads() // at_once)
    return None


def check_threads(threads: int | None) -> int | None:
    """``threads`` as given, once known to be None or a positive count (checked when a party is built)."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r}: give a positive number of torch threads, or None for fedfleet's rule")
    return threads


def parties_at_once(ctx: Any) -> int:
    """How many parties of ``ctx``'s federation train in this process at the same time."""
    if isinstance(ctx, LocalContext) and not ctx.federation.reproducible:
        return ctx.federation.size
    return 1  # in turns, or a party in a process of its own


class PartyThreads:
    """Held while a party trains: sets ``count`` torch threads (None: changes nothing), and gives its thread its
    setting back when it leaves, the process's when it is the last party of the process to leave. torch's setting
    applies to the thread that makes it and to threads started afterwards, so each party sets it in the thread
    it trains in."""

    _lock = threading.Lock()
    _inside = 0  # parties of this process holding a PartyThreads with a count
    _outer = 0  # torch's threads before the first of them came in

    def __init__(self, count: int | None, who: str) -> None:
        self.count = count
        self.who = who
        self.held = False
        self._previous = 0  # this thread's setting before

    def __enter__(self) -> PartyThreads:
        if self.count is None or self.held:
            return self
        cls = type(self)
        with cls._lock:
            if cls._inside == 0:
                cls._outer = torch.get_num_threads()
            cls._inside += 1
            self.held = True
        self._previous, n = torch.get_num_threads(), self.count
        if self._previous != n:
            log.info("%s: training with %d torch thread(s) (threads= or OMP_NUM_THREADS sets others)", self.who, n)
        torch.set_num_threads(self.count)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.held:  # never entered, or already left (a Lightning run ends through several hooks)
            return
        cls = type(self)
        with cls._lock:
            self.held = False
            cls._inside -= 1
            torch.set_num_threads(cls._outer if cls._inside == 0 else self._previous)
