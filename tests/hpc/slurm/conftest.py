"""Real SLURM clusters for the tests under tests/hpc/slurm/ (``.ci/run`` installs SLURM where it can).

``slurm_cluster``: one one-node cluster for the whole session. ``two_slurm_clusters``: two more, side by side,
with their own names, partitions, ports and munge sockets: stand-ins for two facilities. Both skip, with the
missing programs named, where SLURM or munge is not installed, and are torn down at the session's end whatever
happened. Every test here starts real daemons and jobs: each is marked ``slow`` (``make test-fast`` skips them).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, missing_binaries
from tests.ssh_server import SshServer, serve

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


def _skip_without_slurm() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): .ci/run installs it as root with apt-get")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every interface (the daemons listen on all of them), chosen by the OS, so
    clusters of parallel test runs on one machine never collide on SLURM's default 6817/6818."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _started(root: Path, name: str, ports: list[int]) -> SlurmCluster:
    cluster = SlurmCluster(root, name, ports[0], ports[1], partition=f"{name}-part")
    cluster.start()  # on failure it stops what it started and raises with the daemons' logs
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    _skip_without_slurm()
    cluster = _started(tmp_path_factory.mktemp("slurm"), "fedfleet", free_ports(2))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def two_slurm_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SlurmCluster, SlurmCluster]]:
    _skip_without_slurm()
    ports = free_ports(4)
    first = _started(tmp_path_factory.mktemp("slurm-a"), "facility-a", ports[:2])
    try:
        second = _started(tmp_path_factory.mktemp("slurm-b"), "facility-b", ports[2:])
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.fixture
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real sshd on 127.0.0.1 with a key made for the test: a stand-in for a site's login node."""
    yield from serve(tmp_path_factory.mktemp("sshd"))
