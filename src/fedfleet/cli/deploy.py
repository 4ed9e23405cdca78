"""``fedfleet arbiter`` and ``fedfleet party``: the two sides of a deployed federation."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from fedfleet.cli.run_job import run_loop_in_folder
from fedfleet.config import load_job
from fedfleet.errors import ConfigError, UserError
from fedfleet.jobs.deploy import access_of, build_arbiter, build_party


def arbiter_command(
    job_path: str,
    overrides: list[str],
    *,
    insecure: bool,
    certs: str | None,
    address: str | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
) -> int:
    job = load_job(job_path, overrides)
    if job.runtime.kind == "files":  # no network: rounds go through runtime.exchange (docs/file-exchange.md)
        from fedfleet.cli.files import files_arbiter

        return files_arbiter(job, job_path, resume=resume, overwrite=overwrite, quiet=quiet)
    access = access_of(job, insecure, certs, address)
    arbiter = build_arbiter(job, access)  # all checks, before the run folder exists or the port opens
    _exit_cleanly_on_sigterm()
    arbiter.server.start()

    def announce() -> None:
        mode = "plaintext (--insecure)" if access.insecure else f"mTLS with certificates from {access.certs}/"
        print(
            f"arbiter of session {job.network.session!r} listening on {access.address} ({mode}); "
            f"parties: {', '.join(job.network.parties)}",
            file=sys.stderr,
            flush=True,
        )

    try:
        announced = arbiter.needs_a_party_to_start  # network.central_eval: false, so no data here
        if announced:
            announce()
            print("no dataset on the arbiter: the first party to connect sends the initial model", file=sys.stderr)
        loop = arbiter.prepare()
        code = run_loop_in_folder(
            loop,
            job,
            resume_command=f"fedfleet arbiter {job_path}",
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
            checkpoint_every=1,  # a deployed arbiter commits every round, so a crash loses at most one
            on_ready=None if announced else announce,
        )
        if code == 0:
            arbiter.runtime.finish()
        return code  # interrupted (130): the parties keep redialling, for the arbiter resumed with --resume
    except UserError as exc:  # the arbiter gave up (parties missing, rounds incomplete ...): say why, or every
        with contextlib.suppress(Exception):  # party would redial for good
            arbiter.runtime.finish(str(exc).splitlines()[0], failed=True)
        raise
    finally:
        arbiter.server.stop(grace=2.0)


def party_command(
    job_path: str,
    overrides: list[str],
    *,
    name: str | None,
    role: str | None,
    party_id: str | None,
    insecure: bool,
    certs: str | None,
    arbiter: str | None,
    round_: int | None = None,
) -> int:
    """``fedfleet party``: serve the session; after a complete session it ends the process itself. ``round_``: a
    files job's one round to answer."""
    job = load_job(job_path, overrides)
    party_name = name or (f"{role}-{party_id}" if role and party_id else None)
    if party_name is None:
        raise ConfigError("say which party this is: --name guest-9999, or --role guest --party-id 9999")
    if job.runtime.kind == "files":
        from fedfleet.cli.files import files_party

        return files_party(job, party_name, round_)
    if round_ is not None:
        raise ConfigError("--round applies to a job with runtime.kind: files (a gRPC party serves the whole session)")
    party = build_party(job, party_name, access_of(job, insecure, certs, arbiter))
    _exit_cleanly_on_sigterm()
    party.report = lambda line: print(f"{party_name}: {line}", file=sys.stderr, flush=True)
    print(f"{party_name}: dialing the arbiter at {party.conn.address}", file=sys.stderr, flush=True)
    try:
        reason = party.run()
    except KeyboardInterrupt:
        print(f"\n{party_name}: stopped", file=sys.stderr)
        return 130
    print(f"{party_name}: {reason}", file=sys.stderr)
    _leave_without_native_teardown(0)
    return 0


def _leave_without_native_teardown(code: int) -> None:
    """End a party process whose session is complete without running native libraries' exit-time teardown:
    in one fresh-clone suite run (and in issue 21's runs) a finished party died in it with SIGABRT ("terminate
    called without an active exception", a C++ thread destroyed at interpreter exit), turning a clean session
    into exit code -6; the cause is not found. A party has written everything by now: flush and leave."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (e.g. from a scheduler) takes the Ctrl-C path: the arbiter saves its last round."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
