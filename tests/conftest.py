"""Fixtures shared by several test files, and a watchdog on the test process's exit."""

import os
import sys
import threading
import time
import traceback

import pytest
import torch

EXIT_GRACE_S = float(os.environ.get("FEDFLEET_TEST_EXIT_GRACE_S", "60"))
_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_STATUS] = int(exitstatus)


def pytest_unconfigure(config):
    """A thread left blocked by a test must not hang the run past its summary: CI once sat 75 minutes after
    pytest had printed its result, because a gRPC server's handler threads (which the interpreter joins at
    exit) waited for a round that would never end. After ``EXIT_GRACE_S`` this prints every thread's stack and
    ends the process, failing the run (a blocked thread is a bug to fix) or keeping pytest's own failure."""
    status = config.stash.get(_STATUS, 1)

    def watchdog() -> None:
        time.sleep(EXIT_GRACE_S)
        sys.stderr.write(f"\npytest finished (exit status {status}) but the process did not exit within "
                         f"{EXIT_GRACE_S:.0f} s: a thread is blocked; every thread's stack follows\n")  # fmt: skip
        frames = sys._current_frames()
        for thread in threading.enumerate():
            if thread.ident in frames and thread is not threading.current_thread():
                stack = "".join(traceback.format_stack(frames[thread.ident]))
                sys.stderr.write(f"--- thread {thread.name!r} (daemon: {thread.daemon})\n{stack}")
        sys.stderr.flush()
        os._exit(status or 1)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


@pytest.fixture
def one_thread():
    """One torch thread: models this small gain nothing from intra-op threads, and on a busy 2-core machine their
    spin-waits made one fit 100x slower (benchmarks/threads.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
