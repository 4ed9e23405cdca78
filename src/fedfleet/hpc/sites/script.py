"""A site's batch script for one round, from a template filled by substitution only.

The template is plain text with ``@{...}`` placeholders (``string.Template`` with ``@`` as its delimiter, so
``$VAR`` and ``${VAR}`` stay the shell's): ``@{directives}`` (the scheduler's header), ``@{environment}``
(``export`` lines), ``@{setup}`` (the site's set-up lines), ``@{workdir}``, ``@{command}`` (the party's launch
line), ``@{site}`` and ``@{round}``. Values from the job are quoted with ``shlex.quote`` where they land in shell
words; a site's template of its own (``template:``) must hold ``@{command}``, and a placeholder it names that does
not exist is an error naming it, not an empty line.
"""

from __future__ import annotations

import shlex
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedfleet.errors import ConfigError
from fedfleet.hpc.sites.directives import SCHEDULERS, header_lines, launch_prefix
from fedfleet.hpc.sites.site import Site

DEFAULT_TEMPLATE = """\
#!/bin/bash
@{directives}
# fedfleet: site @{site}, round @{round} (written by fedfleet sites; edit the job file, not this script)
# no `set -u`: many sites' module and virtualenv scripts read unset variables
set -eo pipefail
@{environment}
@{setup}
cd @{workdir}
@{command}
"""
MAX_TEMPLATE_BYTES = 1 << 16


class _Template(string.Template):
    delimiter = "@"


@dataclass(frozen=True)
class RoundJob:
    """What a site's job for one round runs: the job file, the round (1-based) and the options ``fedfleet sites
    run`` was given for the job (``--set``), passed on so that the party reads the same job."""

    job_path: str
    round: int | None  # None: one job for the whole session (a party that dials the arbiter over gRPC)
    options: Sequence[str] = ()


def log_name(site: Site, rnd: int | None) -> str:
    """The job's log file name, with the scheduler's job-id placeholder where it has one (sbatch's %j)."""
    marker = SCHEDULERS[site.scheduler].job_id_in_log
    stem = f"round-{rnd:04d}" if rnd is not None else "session"
    return f"{stem}-{marker}.out" if marker else f"{stem}.out"


def log_path(site: Site, folder: Path, rnd: int | None, job_id: str) -> Path:
    """Where the log of job ``job_id`` is (its name with the job id filled in)."""
    marker = SCHEDULERS[site.scheduler].job_id_in_log
    name = log_name(site, rnd)
    return folder / (name.replace(marker, job_id) if marker else name)


def default_python(site: Site) -> str:
    """This interpreter for a site on this machine; ``python3`` on the PATH of a remote one."""
    return site.python or (sys.executable if site.reach == "local" else "python3")


def job_name(site: Site, rnd: int | None) -> str:
    return f"fedfleet-{site.name}" + (f"-r{rnd}" if rnd is not None else "")


def party_command(site: Site, job: RoundJob, python: str) -> str:
    argv = [python, "-m", "fedfleet.cli.main", "party", job.job_path, "--name", site.name]
    if job.round is not None:
        argv += ["--round", str(job.round)]
    line = shlex.join([*argv, *job.options])
    prefix = launch_prefix(site)
    return f"{prefix} {line}" if prefix else line


def render(site: Site, job: RoundJob, *, log: str, workdir: str, python: str) -> str:
    """The batch script of ``site`` for round ``job.round``, its output going to ``log``."""
    values = {
        "directives": "\n".join(header_lines(site, job_name(site, job.round), log)),
        "environment": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in site.job_env().items()),
        "setup": "\n".join(site.setup),
        "workdir": shlex.quote(workdir),
        "command": party_command(site, job, python),
        "site": site.name,
        "round": str(job.round) if job.round is not None else "all",
    }
    text = _template_text(site)
    try:
        return _Template(text).substitute(values)
    except KeyError as exc:
        raise ConfigError(
            f"sites[{site.name}].template: unknown placeholder @{{{exc.args[0]}}}; known: "
            + ", ".join(f"@{{{k}}}" for k in values)
        ) from None
    except ValueError as exc:  # a lone '@' followed by something that is not a name
        raise ConfigError(f"sites[{site.name}].template: {exc} (write @@ for a literal @)") from None


def _template_text(site: Site) -> str:
    if site.template is None:
        return DEFAULT_TEMPLATE
    path = Path(site.template).expanduser()
    try:
        data = path.read_bytes()[: MAX_TEMPLATE_BYTES + 1]
    except OSError as exc:
        raise ConfigError(f"sites[{site.name}].template: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"sites[{site.name}].template: {path} is over {MAX_TEMPLATE_BYTES} bytes: not a job script")
    text = data.decode("utf-8", errors="replace")
    if "@{command}" not in text:
        raise ConfigError(f"sites[{site.name}].template: {path} has no @{{command}}: the job would not train")
    return text
