"""The arbiter's receive buffers: where parties' params land before they are checked and folded.

Memory stays O(model) whatever the number of parties: at most ``limit`` buffers exist, made when first
needed and reused. Each upload holds one buffer from its first chunk to its last, so a party's slowness
costs others nothing while a buffer is free; and since an upload that stops moving would hold its buffer
for good, a party waiting for one takes it back from any holder that has sent nothing for ``stall_s``.

Uploads of another layout than the model's (a secure round's masked inputs, ``secure_wire.masked_spec``) get
a pool of their own, with the same ``limit``: a buffer always goes back to the pool of its own layout.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from fedfleet.core.params import FlatParams, ParamSpec


class Upload:
    """One party's params being received into a buffer; ``lock`` is held while a chunk is written."""

    def __init__(self, party: str, buffer: FlatParams) -> None:
        self.party = party
        self.spec = buffer.spec  # the pool it goes back to
        self.buffer: FlatParams | None = buffer
        self.lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.taken_back = ""  # why the buffer was taken back, once it was

    def touch(self) -> None:
        self.last_progress = time.monotonic()


class ReceiveBuffers:
    def __init__(self, spec: ParamSpec, limit: int, stall_s: float) -> None:
        self.spec = spec
        self.limit = max(1, limit)
        self.stall_s = stall_s
        self._free: defaultdict[ParamSpec, list[FlatParams]] = defaultdict(list)  # by layout
        self._made: Counter[ParamSpec] = Counter()
        self._uploads: set[Upload] = set()
        self._cond = threading.Condition()

    def start(
        self, party: str, give_up: Callable[[], bool], poll_s: float = 0.5, spec: ParamSpec | None = None
    ) -> Upload | None:
        """A buffer of ``spec`` (default: the model's) for ``party``'s upload: a free one, a new one while fewer
        than ``limit`` exist, or one taken back from a stalled upload of that layout. Waits while none is
        available; None once ``give_up()`` says to stop."""
        spec = spec if spec is not None else self.spec
        with self._cond:
            while True:
                free = self._free[spec]
                if free or self._made[spec] < self.limit:
                    buffer = free.pop() if free else self._make(spec)
                    upload = Upload(party, buffer)
                    self._uploads.add(upload)
                    return upload
                stalled = self._stalled(spec)
                # never blocking on the holder's lock here (its reader takes it before this one's): a holder
                # busy writing a chunk is not stalled
                if stalled is not None and stalled.lock.acquire(blocking=False):
                    try:
                        self._take_back(stalled, f"sent no params for {self.stall_s:g} s while others waited")
                    finally:
                        stalled.lock.release()
                    continue
                if give_up():
                    return None
                self._cond.wait(poll_s)

    def stall_reason(self, upload: Upload) -> str:
        """Why ``upload`` counts as stalled ("" when it is still moving)."""
        idle = time.monotonic() - upload.last_progress
        return f"sent no params for {idle:.0f} s (upload_stall_s={self.stall_s:g})" if idle > self.stall_s else ""

    def finish(self, upload: Upload) -> FlatParams | None:
        """The complete upload's buffer, now the caller's (give it back with :meth:`release`); None if taken back.
        The caller holds ``upload.lock``."""
        with self._cond:
            self._uploads.discard(upload)
            buffer, upload.buffer = upload.buffer, None
            return buffer

    def abandon(self, upload: Upload, reason: str) -> None:
        """The upload ends without being used: its buffer goes back to the pool. The caller holds ``upload.lock``."""
        with self._cond:
            self._take_back(upload, reason)

    def release(self, buffer: FlatParams | None) -> None:
        if buffer is None:
            return
        with self._cond:
            self._free[buffer.spec].append(buffer)
            self._cond.notify_all()  # waiters of either layout

    @property
    def allocated(self) -> int:
        return sum(self._made.values())

    # -- internals (hold self._cond) ----------------------------------------------------------------
    def _make(self, spec: ParamSpec) -> FlatParams:
        self._made[spec] += 1
        return FlatParams.zeros(spec)

    def _stalled(self, spec: ParamSpec) -> Upload | None:
        now = time.monotonic()
        idle = [u for u in self._uploads if now - u.last_progress > self.stall_s and u.spec == spec]
        return min(idle, key=lambda u: u.last_progress) if idle else None

    def _take_back(self, upload: Upload, reason: str) -> None:
        self._uploads.discard(upload)
        if upload.buffer is not None:
            self._free[upload.spec].append(upload.buffer)
            upload.buffer = None
            upload.taken_back = upload.taken_back or reason
            self._cond.notify_all()
