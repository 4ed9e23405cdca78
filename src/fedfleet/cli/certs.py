"""``fedfleet certs``: a CA and party certificates for mutual TLS, without reaching for openssl."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CERTS_HELP = """\
Create and inspect the certificates that let the arbiter and the parties of a job authenticate each other
with mutual TLS. A party's identity is the common name (CN) of its certificate. Parties accept only the
certificate named arbiter as the arbiter, whatever address they dial: a party's certificate cannot pose as it.

examples:
  fedfleet certs init certs                       # certs/ca.key, certs/ca.crt
  fedfleet certs issue certs arbiter --host arbiter.example.org --host 10.0.0.5
  fedfleet certs issue certs guest-9999
  fedfleet certs list certs

Keep ca.key on the machine that issues certificates; give each party ca.crt plus its own .key and .crt, and
the arbiter ca.crt plus arbiter.key and arbiter.crt.
"""

INIT_HELP = """\
Create a certificate authority in DIR: ca.key (EC P-256 private key, mode 0600) and ca.crt (self-signed).
Every party trusts ca.crt; every certificate issued from DIR is signed with ca.key.
"""

ISSUE_HELP = """\
Issue a key and a certificate signed by the CA in DIR: DIR/NAME.key (mode 0600) and DIR/NAME.crt. NAME becomes
the certificate's common name, i.e. the identity (arbiter, guest-9999, host-10000).

NAME arbiter: the arbiter's certificate, a TLS server certificate valid for the hosts given with --host
(default localhost, 127.0.0.1, ::1) and for the DNS name arbiter. Parties check that name, not the address
they dial, so the arbiter may be reached at any IP or hostname; --host only matters to other TLS clients.
An arbiter certificate without that name (made by another tool, say) stops the arbiter at start-up with the
fix: re-issue it with `fedfleet certs issue DIR arbiter --overwrite`; `fedfleet certs list DIR` flags it too.

Any other NAME: a party's certificate, a TLS client certificate with no host names (a party only dials the
arbiter, so it never serves). --server makes it serve TLS as well (for --host and NAME), for a party that also
runs a server of its own; it still never passes for the arbiter.
"""


def add_certs_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``certs`` and its subcommands on an argparse subparsers object; return the ``certs`` parser."""
    certs = sub.add_parser(
        "certs",
        help="create a CA and party certificates for mutual TLS",
        description=CERTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    certs.set_defaults(func=lambda args: _help(certs))

    init = certs_sub.add_parser(
        "init",
        help="create a certificate authority (ca.key, ca.crt)",
        description=INIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("dir", metavar="DIR", help="folder for ca.key and ca.crt (created if missing)")
    init.add_argument("--name", default="fedfleet-ca", help="common name of the CA (default: %(default)s)")
    init.add_argument("--days", type=int, default=3650, help="days the CA stays valid (default: %(default)s)")
    init.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing CA; every certificate it issued stops being trusted",
    )
    init.set_defaults(func=_init)

    iss = certs_sub.add_parser(
        "issue",
        help="issue a key and certificate for a party",
        description=ISSUE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    iss.add_argument("dir", metavar="DIR", help="folder holding the CA (from `fedfleet certs init DIR`)")
    iss.add_argument(
        "name",
        metavar="NAME",
        help="identity, the certificate's CN: arbiter for the arbiter, any other name (e.g. guest-9999) for a party",
    )
    iss.add_argument(
        "--host",
        dest="hosts",
        action="append",
        metavar="H",
        help="DNS name or IP address a serving certificate is valid for (repeatable): the arbiter's, or a party's "
        "with --server; default: localhost, 127.0.0.1 and ::1. Giving --host replaces the default",
    )
    iss.add_argument(
        "--server",
        action="store_true",
        help="let a party's certificate serve TLS too (serverAuth, valid for --host and NAME); the arbiter's "
        "always does, and a party needs no server certificate to join a job",
    )
    iss.add_argument("--days", type=int, default=825, help="days the certificate stays valid (default: %(default)s)")
    iss.add_argument("--overwrite", action="store_true", help="replace NAME.key and NAME.crt if they exist")
    iss.set_defaults(func=_issue)

    lst = certs_sub.add_parser(
        "list",
        help="list the certificates in a folder",
        description="Show every DIR/*.crt: path, CN, expiry, issuer and use (ca, client, server); flag an arbiter "
        "certificate that parties would refuse, or another certificate that could pass for the arbiter.",
    )
    lst.add_argument("dir", metavar="DIR", help="folder to list (e.g. the one given to `fedfleet certs init`)")
    lst.set_defaults(func=_list)
    return certs


def _init(args: argparse.Namespace) -> int:
    from fedfleet.security import init_ca

    cert = init_ca(Path(args.dir), name=args.name, days=args.days, overwrite=args.overwrite)
    print(cert.with_name("ca.key"))
    print(cert)
    return 0


def _issue(args: argparse.Namespace) -> int:
    from fedfleet.security import issue

    key, cert = issue(
        Path(args.dir),
        args.name,
        hosts=args.hosts,
        days=args.days,
        server=True if args.server else None,
        overwrite=args.overwrite,
    )
    print(key)
    print(cert)
    return 0


def _list(args: argparse.Namespace) -> int:
    from fedfleet.security import describe

    for row in describe(Path(args.dir)):
        line = f"{row['path']}\tCN={row['cn']}\texpires={row['not_after']:%Y-%m-%d}\tissuer={row['issuer']}"
        line += f"\tuse={row['uses']}"
        problem = _problem(row)
        if problem is not None:
            line += f"\tPROBLEM: {problem}"
        print(line)
    return 0


def _problem(row: dict[str, Any]) -> str | None:
    """An arbiter certificate that parties would refuse, or another certificate that would pass for the arbiter."""
    from fedfleet.runtime.grpc.tls import ARBITER_NAME, arbiter_problem

    path: Path = row["path"]
    refused = arbiter_problem(path)
    if row["name"] == ARBITER_NAME and refused is not None:
        return f"{refused}: parties refuse it; run `fedfleet certs issue {path.parent} {ARBITER_NAME} --overwrite`"
    if row["name"] != ARBITER_NAME and row["uses"] != "ca" and refused is None:
        return (
            f"{path} would pass for the arbiter ({ARBITER_NAME!r} is among its names): whoever holds its key can pose"
            f" as the arbiter; make a new CA (`fedfleet certs init {path.parent} --overwrite`) and re-issue every"
            " certificate"
        )
    return None


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
