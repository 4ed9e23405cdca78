"""One end of a party's stream: an outbox that the gRPC stream drains, lazily expanding params into chunks.

Queued params are not copied: the outbox holds an iterator over the sender's flat buffers, and chunks are
cut only as fast as gRPC takes them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

from fedfleet.runtime.grpc.wire import Message

_CLOSE = object()


class Outbox:
    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self.closed = threading.Event()

    def send(self, item: Message | Iterable[Message]) -> None:
        if not self.closed.is_set():
            self._queue.put(item)

    def close(self) -> None:
        """Stop now: what is queued is dropped (a stream that broke, a party that was replaced)."""
        self.closed.set()
        self._queue.put(_CLOSE)

    def drain(self, timeout: float) -> bool:
        """Close after everything already queued is written; False if that took longer than ``timeout``."""
        self._queue.put(_CLOSE)
        return self.closed.wait(timeout)

    def frames(self) -> Iterator[Message]:
        """The messages to write, in order; ends when the outbox is closed."""
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                self.closed.set()
                return
            if isinstance(item, Message):
                yield item
            else:
                for msg in item:  # type: ignore[union-attr]
                    if self.closed.is_set():
                        return
                    yield msg
            # hold nothing sent while waiting for the next: a chunk's payload is a view of the params it came from,
            # which their owner may reuse once no chunk of them is left (secure_party.py)
            item = msg = None


class PartyLink:
    """The arbiter's view of one connected party."""

    def __init__(self, name: str, index: int, generation: int) -> None:
        self.name = name
        self.index = index
        self.generation = generation  # a reconnect replaces the link; stale links must not report for it
        self.outbox = Outbox()
