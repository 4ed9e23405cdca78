"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: models this small gain nothing from intra-op threads, and on a busy 2-core machine their
    spin-waits made one fit 100x slower (benchmarks/threads.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
