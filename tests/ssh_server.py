"""A real OpenSSH server on localhost for the tests: its own host key, a client key made for the test, a config
in a temp folder, listening on a free port of 127.0.0.1 only, stopped at the end. Stands in for a site's login node.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing() -> list[str]:
    found = {"sshd": os.access(SSHD, os.X_OK)}
    found.update({name: shutil.which(name) is not None for name in ("ssh", "ssh-keygen", "rsync")})
    return [name for name, ok in found.items() if not ok]


class SshServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.user = getpass.getuser()
        self.port = _free_port()
        self.key = self.root / "client_key"
        self.known_hosts = self.root / "known_hosts"
        self._proc: subprocess.Popen | None = None

    @property
    def reach(self) -> str:
        return f"ssh:{self.user}@127.0.0.1:{self.port}"

    @property
    def options(self) -> list[str]:
        """What a client needs to trust this server and nothing else."""
        return [f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes"]

    def start(self, timeout: float = 20) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "host_key"
        for path in (host_key, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        host_pub = (self.root / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nX11Forwarding no\nMaxSessions 50\nMaxStartups 50\n"
            "Subsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        log = open(self.root / "sshd.log", "w")  # noqa: SIM115 - open for the daemon's life
        self._proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start: {(self.root / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def ssh(self, command: str) -> subprocess.CompletedProcess:
        argv = ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "BatchMode=yes"]
        for option in self.options:
            argv += ["-o", option]
        return subprocess.run([*argv, f"{self.user}@127.0.0.1", command], capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def _answers(self) -> bool:
        try:
            return self.ssh("true").returncode == 0
        except subprocess.TimeoutExpired:
            return False


def serve(root: Path) -> Iterator[SshServer]:
    """A started server for a fixture (skipping, with what is missing named, where OpenSSH or rsync is not
    installed), stopped afterwards whatever happened."""
    import pytest

    if missing():
        pytest.skip(f"OpenSSH server or rsync not installed (missing {', '.join(missing())}): .ci/run installs them")
    server = SshServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
