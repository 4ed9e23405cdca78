"""``fedfleet``: the command line. User errors print one message and exit 2; Ctrl-C exits 130 after saving."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from fedfleet import __version__
from fedfleet.cli.certs import add_certs_parser
from fedfleet.cli.local import add_local_parser
from fedfleet.cli.merge import add_merge_parser
from fedfleet.cli.sites import add_sites_parser
from fedfleet.cli.tokenize import add_tokenize_parser
from fedfleet.errors import UserError

EPILOG = """\
examples:
  fedfleet simulate examples/digits_fedavg.yaml
  fedfleet simulate examples/digits_fedavg.yaml --set client.lr=0.1 --set strategy.name=fedyogi
  fedfleet simulate job.yaml --resume            # continue an interrupted run from its last checkpoint
  fedfleet simulate --from-fedscale conf.yml     # a FedScale job file (job_conf: list) as it is
  fedfleet simulate --from-fedscale conf.yml --print-config > job.yaml   # ... as a fedfleet job file
  fedfleet list                                  # registered strategies, models, datasets, ...

deployed (one arbiter and data-owner parties over gRPC with mutual TLS):
  fedfleet certs init certs && fedfleet certs issue certs arbiter
  fedfleet certs issue certs guest-9999 && fedfleet certs issue certs host-10000
  fedfleet arbiter examples/digits_grpc.yaml                              # terminal 1
  fedfleet party examples/digits_grpc.yaml --role guest --party-id 9999   # terminal 2
  fedfleet party examples/digits_grpc.yaml --role host --party-id 10000   # terminal 3
  fedfleet local examples/digits_grpc.yaml       # all of the above in one command, for a quick try

HPC facilities as parties (one batch job per site per round, no network on compute nodes):
  fedfleet sites render job.yaml --site guest    # the SLURM script fedfleet writes for a site
  fedfleet sites run job.yaml                    # submit, follow and fold every round (docs/hpc.md)
"""

ARBITER_HELP = """\
Run the arbiter (coordinator) of a deployed federation. It listens on network.address, waits for the
parties in network.parties to dial in, and drives the job's rounds: it selects parties, sends them the
global model and the training config, validates and folds their updates, and checkpoints every round
in <output.dir>/<name>/ (resume after a crash with --resume). Parties authenticate with certificates
from network.certs (see `fedfleet certs`); plaintext needs an explicit --insecure.
"""

PARTY_HELP = """\
Run one data-owner party. It dials the arbiter (no inbound port needed), joins the session with its
certificate, and trains on its own data whenever the arbiter asks; it reconnects with backoff if the
arbiter or the network goes away, and exits when the session is done. The party's name (e.g.
guest-9999) must be in network.parties and is the common name of its certificate.
"""

SIMULATE_HELP = """\
Run a simulated federation described by a YAML job file (see examples/). The run folder
<output.dir>/<name>/ receives config.yaml, metrics.csv, metrics.jsonl, TensorBoard events (tb/),
checkpoint.safetensors, model.safetensors and status.json. Every key of the job file can be
overridden with --set; a typo'd key or a bad value is reported before any work starts.

--from-fedscale conf.yml runs a FedScale job file instead: its job_conf keys are translated (with
FedScale's defaults for keys it leaves out), keys that do not apply are named in a warning, and
--print-config shows the fedfleet job file it became (see docs/coming-from-fedscale.md).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfleet",
        description="Federated learning of deep models: simulate thousands of clients on one machine, or deploy "
        "an arbiter and data-owner parties over gRPC with mutual TLS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedfleet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fedfleet decides (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a simulated federation from a YAML job file",
        description=SIMULATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("job", nargs="?", help="the YAML job file (keys: name, seed, rounds, cohort, data, model, ...)")
    sim.add_argument(
        "--from-fedscale",
        metavar="CONF_YML",
        help="run a FedScale job file (its job_conf: list) instead; --set takes fedfleet keys on top",
    )
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the job file, dotted for nested keys (repeatable): --set client.lr=0.1",
    )
    mode = sim.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    sim.add_argument("--dry-run", action="store_true", help="check the job, print the resolved config, run nothing")
    sim.add_argument(
        "--print-config",
        action="store_true",
        help="print the job as a fedfleet job file (with --from-fedscale: the translation) and run nothing",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar or per-round table")
    _add_import_arg(sim)
    sim.set_defaults(func=_simulate)

    _add_deploy_parsers(sub)
    add_certs_parser(sub)
    add_local_parser(sub)
    add_merge_parser(sub)
    add_tokenize_parser(sub)
    add_sites_parser(sub)

    lst = sub.add_parser("list", help="list registered strategies, models, datasets, partitioners, selectors")
    lst.add_argument("kind", nargs="?", help="only this kind (e.g. strategies)")
    _add_import_arg(lst)
    lst.set_defaults(func=_list)
    return parser


def _add_import_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first, e.g. one that registers your model or dataset (repeatable; found in the "
        "job file's folder, the current folder or sys.path)",
    )


def _add_job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="the YAML job file; its network: section describes the deployment")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the job file (repeatable): --set network.round_timeout=120",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC, identities taken on trust (trusted networks only)"
    )
    parser.add_argument("--certs", metavar="DIR", help="certificate folder (default: network.certs)")
    _add_import_arg(parser)


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    arb = sub.add_parser(
        "arbiter",
        help="run the arbiter of a deployed federation",
        description=ARBITER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_args(arb)
    arb.add_argument("--address", metavar="HOST:PORT", help="listen here (default: network.address)")
    mode = arb.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last committed round")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    arb.add_argument("--quiet", action="store_true", help="no progress bar or per-round table")
    arb.set_defaults(func=_arbiter)

    party = sub.add_parser(
        "party",
        help="run one data-owner party (guest or host) of a deployed federation",
        description=PARTY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_args(party)
    party.add_argument("--name", help="the party's name, e.g. guest-9999 (or give --role and --party-id)")
    party.add_argument("--role", choices=("guest", "host"), help="the party's role; with --party-id names it")
    party.add_argument("--party-id", help="the party's id within its role, e.g. 9999")
    party.add_argument("--arbiter", metavar="HOST:PORT", help="the arbiter's address (default: network.address)")
    party.add_argument(
        "--round", type=int, metavar="N", help="runtime.kind: files only: answer round N (1-based) and exit, as a "
        "batch job per round does (default: every round from the earliest the exchange folder holds)"
    )  # fmt: skip
    party.set_defaults(func=_party)

    offsite = sub.add_parser(
        "offsite",
        help="run one side of an Offsite-Tuning job (model owner, or data owner) from its YAML",
        description="Offsite-Tuning: the model owner (role: arbiter) hands out adapters and an emulator, data "
        "owners (guest, host) tune the adapters, the owner plugs them back. One YAML per side; see "
        "examples/offsite/ and docs/offsite-tuning.md.",
    )
    offsite.add_argument("job", help="this side's YAML, e.g. examples/offsite/owner.yaml")
    offsite.add_argument("--dry-run", action="store_true", help="check the YAML, print the resolved job, run nothing")
    offsite.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, identities taken on trust (trusted networks only); a YAML's insecure: true needs it too",
    )
    offsite.set_defaults(func=_offsite)


def _offsite(args: argparse.Namespace) -> int:
    from fedfleet.cli.offsite import offsite_command

    return offsite_command(args.job, dry_run=args.dry_run, insecure=args.insecure)


def _arbiter(args: argparse.Namespace) -> int:
    from fedfleet.cli.deploy import arbiter_command

    return arbiter_command(
        args.job,
        args.overrides,
        insecure=args.insecure,
        certs=args.certs,
        address=args.address,
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def _party(args: argparse.Namespace) -> int:
    from fedfleet.cli.deploy import party_command

    return party_command(
        args.job,
        args.overrides,
        name=args.name,
        role=args.role,
        party_id=args.party_id,
        insecure=args.insecure,
        certs=args.certs,
        arbiter=args.arbiter,
        round_=args.round,
    )


def _simulate(args: argparse.Namespace) -> int:
    from fedfleet.cli.simulate import simulate_command

    return simulate_command(
        args.job,
        args.overrides,
        fedscale=args.from_fedscale,
        resume=args.resume,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        print_config=args.print_config,
        quiet=args.quiet,
    )


def _list(args: argparse.Namespace) -> int:
    from fedfleet.cli.listing import list_command

    return list_command(args.kind)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "imports", None):  # before the job is read: the modules register what it names
            from fedfleet.config.imports import import_user_modules

            import_user_modules(args.imports, near=getattr(args, "job", None))
        return func(args)
    except UserError as exc:
        print(f"fedfleet: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
