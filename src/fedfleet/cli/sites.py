"""``fedfleet sites render`` and ``fedfleet sites run``: the job file's facilities as batch jobs, one per round."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

SITES_HELP = """\
Run a federation whose parties are HPC facilities (the job file's sites: list). With runtime.kind: files, each
round the arbiter publishes the global model in runtime.exchange, writes each selected site's batch script
(its scheduler's directives, the Hugging Face offline variables, the site's set-up lines, then
`python -m fedfleet.cli.main party JOB --name SITE --round N`, behind srun when the site runs several ranks),
submits it, follows the job (squeue, then scontrol: no accounting needed), folds the updates the jobs publish,
and checkpoints the round. Scripts and job logs go to <output.dir>/<name>/sites/<site>/. A job that ends
without its update stops the run with its id, state and log; Ctrl-C cancels the jobs still queued or running.
Without runtime.kind: files (a gRPC session), each site gets one job for the whole run whose party dials
network.address, and the arbiter runs here; those scripts and logs go to <output.dir>/<name>.sites/<site>/.

  fedfleet sites render job.yaml --site guest --round 1    # the script, to read or to submit by hand
  fedfleet sites run job.yaml                              # the whole run, from a login node or a laptop
  fedfleet sites run job.yaml --resume                     # after a failed or cancelled round

SLURM sites are submitted to: reach: local runs sbatch on this machine (with the site's scheduler_env, e.g.
SLURM_CONF); reach: ssh:user@login runs it on the site's login node and copies the rounds to and from its
remote_dir with rsync. PBS and Flux scripts are rendered for you to submit (docs/hpc.md).
"""


SESSION_END_GRACE_S = 60.0  # a finished session's party jobs exit by themselves: cancelled only after this


def add_sites_parser(sub: Any) -> argparse.ArgumentParser:
    sites = sub.add_parser(
        "sites",
        help="run a federation of HPC sites as batch jobs (per round over a folder, or one each over gRPC)",
        description=SITES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = sites.add_subparsers(dest="sites_command", metavar="ACTION", required=True)
    render = actions.add_parser("render", help="print the batch script of a site (every site by default)")
    render.add_argument("job", help="the YAML job file with a sites: list")
    render.add_argument("--site", metavar="NAME", help="only this site")
    render.add_argument("--round", type=int, default=1, metavar="N",
                        help="runtime.kind: files: the round the script answers (default 1)")  # fmt: skip
    run = actions.add_parser("run", help="run every round, submitting each selected site's job and following it")
    run.add_argument("job", help="the YAML job file with a sites: list")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last committed round")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round table")
    run.add_argument(
        "--insecure", action="store_true",
        help="gRPC sessions: plaintext, identities taken on trust (trusted networks only); passed on to the parties",
    )  # fmt: skip
    for action in (render, run):
        action.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a key of the job file (repeatable); passed on to every site's party",
        )  # fmt: skip
    sites.set_defaults(func=sites_command)
    return sites


def sites_command(args: argparse.Namespace) -> int:
    from fedfleet.config import load_job

    job = load_job(args.job, args.overrides)
    if not job.sites:
        from fedfleet.errors import ConfigError

        raise ConfigError(f"{args.job} has no sites: list (docs/hpc.md shows one)")
    if args.sites_command == "render":
        return _render(job, args)
    return _run(job, args)


def _options(args: argparse.Namespace) -> list[str]:
    return [word for override in args.overrides for word in ("--set", override)]


def _render(job: Any, args: argparse.Namespace) -> int:
    from fedfleet.errors import ConfigError
    from fedfleet.hpc.sites.script import RoundJob, default_python, log_name, render

    if not 1 <= args.round <= job.rounds:
        raise ConfigError(f"--round {args.round} is not a round of this job (1 to {job.rounds})")
    chosen = [s for s in job.sites if args.site in (None, s.name)]
    if not chosen:
        raise ConfigError(f"--site {args.site}: no such site (sites: {', '.join(s.name for s in job.sites)})")
    per_round = job.runtime.kind == "files"  # else a gRPC session: one job per site, for every round
    folder = Path(job.output.dir) / (f"{job.name}/sites" if per_round else f"{job.name}.sites")
    rnd = args.round if per_round else None
    for site in chosen:
        log = (folder / site.name).resolve() / log_name(site, rnd)
        round_job = RoundJob(str(Path(args.job).resolve()), rnd, _options(args))
        if len(chosen) > 1:
            print(f"# ===== site {site.name} ({site.scheduler}) =====")
        script = render(site, round_job, log=str(log), workdir=site.workdir or os.getcwd(), python=default_python(site))
        print(script, end="")
    return 0


def _run(job: Any, args: argparse.Namespace) -> int:
    if job.runtime.kind != "files":
        return _run_grpc(job, args)
    from fedfleet.cli.run_job import run_loop_in_folder
    from fedfleet.hpc.sites.runtime import SiteRuntime
    from fedfleet.jobs.files import build_file_arbiter

    command = f"fedfleet sites run {args.job}" + "".join(f" --set {o}" for o in args.overrides)
    arbiter = build_file_arbiter(
        job,
        runtime_class=SiteRuntime,
        sites=job.sites,
        job_path=args.job,
        scripts=Path(job.output.dir) / job.name / "sites",
        options=_options(args),
        resume_hint=command,
    )
    runtime: SiteRuntime = arbiter.runtime  # type: ignore[assignment]
    print(
        f"sites {', '.join(s.name for s in job.sites)} exchanging rounds through {job.runtime.exchange}",
        file=sys.stderr,
        flush=True,
    )
    try:
        code = run_loop_in_folder(
            arbiter.loop,
            job,
            resume_command=command,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
            checkpoint_every=1,  # a round of batch jobs is costly: a failure loses at most one
        )
        if code == 0:
            runtime.publish_final(arbiter.loop.global_params)
        return code
    finally:
        runtime.cancel_active()  # Ctrl-C, a failure: nothing fedfleet submitted is left queued or running
        runtime.close()


def _run_grpc(job: Any, args: argparse.Namespace) -> int:
    """One job per site for the whole session, its party dialling this arbiter; the arbiter runs here."""
    from fedfleet.cli.deploy import arbiter_command
    from fedfleet.hpc.sites.session import SessionJobs

    options = _options(args) + (["--insecure"] if args.insecure else [])
    # beside the run folder, not in it: the jobs start before the arbiter prepares its folder (a model-less
    # arbiter waits for a party's initial model first), and a fresh run's folder must be empty then
    scripts = Path(job.output.dir) / f"{job.name}.sites"
    certs = None if args.insecure or job.network.insecure else job.network.certs
    jobs = SessionJobs(job.sites, job_path=args.job, scripts=scripts, options=options, certs=certs)
    jobs.start()
    code = 1
    try:
        code = arbiter_command(args.job, args.overrides, insecure=args.insecure, certs=None, address=None,
                               resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)  # fmt: skip
        return code
    finally:  # the session is over (or failed, or Ctrl-C): nothing fedfleet submitted stays queued
        jobs.stop(grace_s=SESSION_END_GRACE_S if code == 0 else 0.0)
