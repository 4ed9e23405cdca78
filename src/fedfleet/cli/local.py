"""``fedfleet local``: the arbiter and every party of a job as separate processes on this machine.

For a quick try of a deployment: certificates are created if the folder has none, each process's output
is shown with its name in front, and Ctrl-C stops all of them (the arbiter saves its last round).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

LOCAL_HELP = """\
Start the arbiter and all parties listed in network.parties as separate processes on this machine, over
real gRPC with mutual TLS (certificates are created in network.certs if it holds none). The same job file
runs unchanged on several machines with `fedfleet arbiter` and `fedfleet party`.
"""


def add_local_parser(sub: Any) -> None:
    local = sub.add_parser(
        "local",
        help="start an arbiter and all parties on this machine (a quick try of a deployment)",
        description=LOCAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    local.add_argument("job", help="the YAML job file, with a network: section")
    local.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the job file, for every process (repeatable)",
    )
    local.add_argument("--insecure", action="store_true", help="plaintext instead of mutual TLS")
    local.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    local.set_defaults(func=_local)


def _local(args: argparse.Namespace) -> int:
    from fedfleet.config import load_job
    from fedfleet.jobs.deploy import ARBITER_NAME, access_of, party_names

    job = load_job(args.job, args.overrides)
    names = party_names(job)
    access = access_of(job, args.insecure)
    if not access.insecure:
        _ensure_certs(Path(access.certs), [ARBITER_NAME, *names])
    common = [args.job, *(f"--set={o}" for o in args.overrides)] + (["--insecure"] if access.insecure else [])
    base = [sys.executable, "-m", "fedfleet.cli.main"]
    arbiter_cmd = [*base, "arbiter", *common] + (["--overwrite"] if args.overwrite else [])
    procs = {"arbiter": _start(arbiter_cmd, "arbiter")}
    for name in names:
        procs[name] = _start([*base, "party", *common, "--name", name], name)
    try:
        code = procs["arbiter"].wait()
        for name in names:
            try:
                procs[name].wait(timeout=30)
            except subprocess.TimeoutExpired:
                procs[name].terminate()
        return code
    except KeyboardInterrupt:
        for proc in procs.values():
            proc.terminate()
        procs["arbiter"].wait()
        return 130


def _ensure_certs(folder: Path, names: list[str]) -> None:
    from fedfleet.security import init_ca, issue

    if not (folder / "ca.crt").is_file():
        init_ca(folder)
        print(f"created a certificate authority in {folder}/", file=sys.stderr)
    for name in names:
        if not (folder / f"{name}.crt").is_file():
            issue(folder, name)
            print(f"issued {folder}/{name}.crt", file=sys.stderr)


def _start(cmd: list[str], name: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    threading.Thread(target=_relay, args=(proc, name), daemon=True).start()
    return proc


def _relay(proc: subprocess.Popen, name: str) -> None:
    width = 12
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(f"{name[:width]:>{width}} | {line}")
        sys.stdout.flush()
