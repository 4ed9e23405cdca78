"""What one party's streams may cost the arbiter: how many at once, how long before a join, how many messages.

Each stream holds a gRPC handler thread, and the thread pool is sized for the job's parties; a party that
opened streams without end (or never sent its join) would leave no thread to welcome the others. So each
certified identity holds at most ``STREAMS_PER_PARTY`` streams (a new one closes its oldest: a party that
restarts gets in at once, a party that opens hundreds only ever holds two), a stream must join within
``JOIN_DEADLINE_S``, and the messages that are not params (heartbeats, results, failures) are rationed.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Protocol

STREAMS_PER_PARTY = 2  # the live stream and the one replacing it after a restart
JOIN_DEADLINE_S = 10.0  # a party sends its join as its first message: 10 s allows a slow handshake
MESSAGE_RATE = 20.0  # messages per second other than params chunks, sustained (a heartbeat every 5 s is 0.2)
MESSAGE_BURST = 500.0  # ... and at once
BAD_MESSAGES_PER_STREAM = 1000  # refused or unexpected messages before the arbiter closes the stream


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class StreamLimits:
    """The open streams of each identity; opening one beyond the limit cancels that identity's oldest."""

    def __init__(self, per_identity: int = STREAMS_PER_PARTY) -> None:
        self.per_identity = per_identity
        self._open: dict[str, list[Cancellable]] = defaultdict(list)
        self._lock = threading.Lock()

    def open(self, identity: str, stream: Cancellable) -> None:
        with self._lock:
            streams = self._open[identity]
            streams.append(stream)
            oldest = streams[: -self.per_identity]
            del streams[: -self.per_identity]
        for old in oldest:
            old.cancel()

    def close(self, identity: str, stream: Cancellable) -> None:
        with self._lock:
            streams = self._open.get(identity, [])
            if stream in streams:
                streams.remove(stream)
            if not streams:
                self._open.pop(identity, None)

    def count(self, identity: str) -> int:
        with self._lock:
            return len(self._open.get(identity, []))


class MessageBudget:
    """A token bucket: ``take()`` is False once a stream sends faster than ``rate`` beyond a burst of ``burst``."""

    def __init__(self, rate: float = MESSAGE_RATE, burst: float = MESSAGE_BURST) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
