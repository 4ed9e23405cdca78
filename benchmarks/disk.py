"""The disk's own speed, measured by the benchmarks that move big files (merge.py, files_exchange.py), so their
throughput is a fraction of it: a cold sequential read (pages dropped with posix_fadvise first, and whether the
drop took checked against /proc/meminfo) and a sequential write ended by an fsync. No torch: the merge benchmark's
parent process must stay small."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

READ = 8 << 20


def cached_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return -1


def drop_cache(files: list[Path]) -> dict[str, Any]:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED); say how much of Cached went."""
    before = cached_kb()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    after = cached_kb()
    size_kb = sum(f.stat().st_size for f in files) // 1024
    return {"dropped_kb": before - after, "files_kb": size_kb, "took": before - after >= 0.8 * size_kb}


def read_bandwidth(files: list[Path]) -> tuple[float, dict[str, Any]]:
    """Bytes per second of a cold sequential read of ``files`` (8 MiB reads)."""
    dropped = drop_cache(files)
    buf = bytearray(READ)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total / (time.perf_counter() - start), dropped


def write_bandwidth(folder: Path, nbytes: int) -> float:
    """Bytes per second of a sequential write of ``nbytes`` with an fsync at the end (as the merge publishes)."""
    block = os.urandom(READ)
    path = folder / "write-probe.bin"
    start = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as f:
            for _ in range(max(1, nbytes // READ)):
                f.write(block)
            os.fsync(f.fileno())
        return max(1, nbytes // READ) * READ / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)
