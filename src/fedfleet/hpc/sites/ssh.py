"""Reaching a site over SSH: its scheduler's commands run on its login node, the exchange folder is copied both ways.

One OpenSSH connection per site is kept open (``ControlMaster``/``ControlPersist``) and every command and copy goes
through it; ``BatchMode`` means no prompt ever waits for a password. Files move with rsync over that connection:
a round's global model to the site's ``remote_dir/exchange``, and the site's update back. Both sides look only for
manifests, so a copy sends the data files first and the manifest last, and an update pulled from the site lands in
a staging folder first, then its data files, then its manifest, go into place: a manifest never arrives before the
files it lists (the reader would refuse them). The files are checked by their SHA-256 when read, as always.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedfleet.errors import UserError
from fedfleet.hpc.sites.site import Site
from fedfleet.runtime.files.exchange import MANIFEST, MAX_MANIFEST_BYTES, PLAIN_NAME, Refused, read_manifest

_REACH = re.compile(r"^ssh:(?P<user>[^@]+)@(?P<host>[^:]+)(?::(?P<port>\d+))?$")
TIMEOUT_S = 300.0


class RemoteError(UserError):
    """A command or a copy over SSH failed; the message holds the site, what was run and what it printed."""


@dataclass(frozen=True)
class SshTarget:
    site: str
    user: str
    host: str
    port: int | None
    key: str | None
    options: tuple[str, ...]
    control_dir: str

    @classmethod
    def of(cls, site: Site) -> SshTarget:
        found = _REACH.match(site.reach)
        if found is None:
            raise UserError(f"sites[{site.name}].reach {site.reach!r} is not ssh:user@host[:port]")
        port = found.group("port")
        # the control socket's path must be short (sun_path: 108 bytes): a folder of its own under /tmp
        control = tempfile.mkdtemp(prefix="fedfleet-ssh-")
        return cls(site.name, found.group("user"), found.group("host"), int(port) if port else None,
                   site.ssh_key, tuple(site.ssh_options), control)  # fmt: skip

    def ssh_options(self) -> list[str]:
        argv = ["-o", "BatchMode=yes", "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C",
                "-o", "ControlPersist=120", "-o", "ConnectTimeout=30"]  # fmt: skip
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.key is not None:
            argv += ["-i", os.path.expanduser(self.key)]
        for option in self.options:
            argv += ["-o", option]
        return argv

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"

    def run(self, command: Sequence[str], *, stdin: str | None = None, check: bool = True, env: dict | None = None,
            cwd: str | None = None) -> str:  # fmt: skip
        """``command`` (an argv) run on the site, in ``cwd``, with ``env`` set; its stdout."""
        line = shlex.join(command)
        if env:
            line = shlex.join(["env", *(f"{k}={v}" for k, v in env.items())]) + " " + line
        if cwd is not None:
            line = f"mkdir -p {shlex.quote(cwd)} && cd {shlex.quote(cwd)} && {line}"
        done = self._call(["ssh", *self.ssh_options(), self.login, line], stdin=stdin, what=command[0])
        if check and done.returncode != 0:
            why = (done.stderr or done.stdout).strip()[-2000:]
            raise RemoteError(
                f"site {self.site}: {' '.join(command[:2])} on {self.host} failed ({done.returncode}): {why}"
            )
        return done.stdout

    def push(self, local: Path, remote: str) -> None:
        """The files of folder ``local`` into folder ``remote`` on the site: data files first, manifest last."""
        self.run(["mkdir", "-p", remote])
        self._rsync(["--exclude", MANIFEST, f"{local}/", f"{self.login}:{remote}/"], recursive=True)
        if (local / MANIFEST).exists():
            self._rsync([str(local / MANIFEST), f"{self.login}:{remote}/{MANIFEST}"])

    def push_file(self, local: Path, remote: str) -> None:
        self._rsync([str(local), f"{self.login}:{remote}"])

    def pull_published(self, remote: str, staging: Path, target: Path, max_bytes: int) -> bool:
        """Folder ``remote`` of the site into ``target``, once it holds a manifest. Only what the manifest lists
        is copied (plain names, at most ``max_bytes`` in all: a site cannot fill this disk), into ``staging``
        first; then the data files, and last the manifest, move into ``target``. A manifest that cannot be read
        moves in alone, for the runtime to refuse with its reason. False while the site has no manifest there."""
        listing = self.run(["ls", "-1", remote], check=False)
        if MANIFEST not in listing.split():
            return False
        staging.mkdir(parents=True, exist_ok=True)
        self._rsync(["--max-size", str(MAX_MANIFEST_BYTES), f"{self.login}:{remote}/{MANIFEST}", f"{staging}/"])
        if not (staging / MANIFEST).exists():
            return False  # bigger than a manifest can be: left on the site, named when it is refused there
        names = _listed(staging / MANIFEST, max_bytes)
        if names:
            listing_file = staging.parent / f".{staging.name}.files"
            listing_file.write_text("".join(f"{name}\n" for name in names))
            try:
                self._rsync(["--files-from", str(listing_file), "--max-size", str(max_bytes),
                             f"{self.login}:{remote}/", f"{staging}/"])  # fmt: skip
            except RemoteError:  # a listed file missing there (rsync exits 23): what came, and the manifest,
                pass  # go in, and the runtime refuses the update naming the file that did not
            finally:
                listing_file.unlink(missing_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (staging / name).is_file():
                os.replace(staging / name, target / name)
        os.replace(staging / MANIFEST, target / MANIFEST)
        return True

    def close(self) -> None:
        """End the kept connection (it would end by itself ``ControlPersist`` seconds after the last use)."""
        self._call(["ssh", *self.ssh_options(), "-O", "exit", self.login], stdin=None, what="ssh -O exit")
        shutil.rmtree(self.control_dir, ignore_errors=True)  # the socket's folder, made by ``of``

    def _rsync(self, args: list[str], recursive: bool = False) -> None:
        """rsync over the kept connection. -t: files with their times; no owners, modes or links (a site's
        folder could hold a link to a file of this machine: rsync skips it). Pulls never recurse: a listed name
        that is a folder on the site is skipped, not copied with whatever it holds."""
        shell = shlex.join(["ssh", *self.ssh_options()])
        flags = "-rt" if recursive else "-t"
        done = self._call(["rsync", flags, "-e", shell, *args], stdin=None, what="rsync")
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip()[-2000:]
            raise RemoteError(f"site {self.site}: rsync {' '.join(args[-2:])} failed ({done.returncode}): {why}")

    def _call(self, argv: list[str], *, stdin: str | None, what: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise RemoteError(f"site {self.site}: {argv[0]} not found: install OpenSSH's client and rsync") from None
        except subprocess.TimeoutExpired:
            raise RemoteError(f"site {self.site}: {what} on {self.host} did not answer in {TIMEOUT_S:g} s") from None


def _listed(manifest: Path, max_bytes: int) -> list[str]:
    """The data files ``manifest`` lists, if it is one of ours and they fit in ``max_bytes``; else none."""
    try:
        body = read_manifest(manifest)
    except Refused:
        return []
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict):
        return []
    names = [n for n in files if isinstance(n, str) and PLAIN_NAME.match(n) and n != MANIFEST]
    sizes = [entry.get("bytes") if isinstance(entry, dict) else None for entry in files.values()]
    if len(names) != len(files) or not all(isinstance(b, int) and b >= 0 for b in sizes) or sum(sizes) > max_bytes:
        return []
    return names
