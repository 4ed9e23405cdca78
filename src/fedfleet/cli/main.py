"""``fedfleet``: the command line. User errors print one message and exit 2; Ctrl-C exits 130 after saving."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from fedfleet import __version__
from fedfleet.errors import UserError

EPILOG = """\
examples:
  fedfleet simulate examples/digits_fedavg.yaml
  fedfleet simulate examples/digits_fedavg.yaml --set client.lr=0.1 --set strategy.name=fedyogi
  fedfleet simulate job.yaml --resume            # continue an interrupted run from its last checkpoint
  fedfleet list                                  # registered strategies, models, datasets, ...
"""

SIMULATE_HELP = """\
Run a simulated federation described by a YAML job file (see examples/). The run folder
<output.dir>/<name>/ receives config.yaml, metrics.csv, metrics.jsonl, TensorBoard events (tb/),
checkpoint.safetensors, model.safetensors and status.json. Every key of the job file can be
overridden with --set; a typo'd key or a bad value is reported before any work starts.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfleet",
        description="Federated learning of deep models: simulate thousands of clients on one machine.",
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
    sim.add_argument("job", help="the YAML job file (keys: name, seed, rounds, cohort, data, model, ...)")
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
    sim.add_argument("--quiet", action="store_true", help="no progress bar or per-round table")
    sim.set_defaults(func=_simulate)

    lst = sub.add_parser("list", help="list registered strategies, models, datasets, partitioners, selectors")
    lst.add_argument("kind", nargs="?", help="only this kind (e.g. strategies)")
    lst.set_defaults(func=_list)
    return parser


def _simulate(args: argparse.Namespace) -> int:
    from fedfleet.cli.simulate import simulate_command

    return simulate_command(
        args.job, args.overrides, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run, quiet=args.quiet
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
        return func(args)
    except UserError as exc:
        print(f"fedfleet: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
