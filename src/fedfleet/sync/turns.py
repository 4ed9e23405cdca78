"""Turns for in-process parties: torch's random generators are process-wide, so parties that train in threads
of one process take turns, each with its own random state, and a seeded run repeats bit for bit."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class Turn:
    """One in-process party's run: it holds the federation's floor while it trains and lets go only while it
    waits at a start or sync, and it brings its own random-number state. torch's generators are
    process-wide, so otherwise the threads' dropout draws and data-order seeds would interleave at random.
    The first turn seeds torch with the party's seed, as a process of its own would."""

    def __init__(self, lock: threading.Lock, seed: int) -> None:
        self.lock = lock
        self.seed = seed
        self.cpu: torch.Tensor | None = None
        self.cuda: list[torch.Tensor] | None = None
        self._outer: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None
        self.held = False

    def __enter__(self) -> Turn:
        self.lock.acquire()
        self.held = True
        cuda = torch.cuda.is_initialized()
        self._outer = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
        if self.cpu is None:
            torch.manual_seed(self.seed)  # every device, like transformers' set_seed
        else:
            torch.set_rng_state(self.cpu)
            if cuda and self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.held:  # already let go (a Lightning run ends through more than one hook)
            return
        try:
            self.cpu = torch.get_rng_state()
            outer_cpu, outer_cuda = self._outer
            if torch.cuda.is_initialized():
                self.cuda = torch.cuda.get_rng_state_all()
                if outer_cuda is not None:
                    torch.cuda.set_rng_state_all(outer_cuda)
            torch.set_rng_state(outer_cpu)
        finally:
            self.held = False
            self.lock.release()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Let the others train while this party waits for them."""
        if not self.held:
            yield
            return
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()
