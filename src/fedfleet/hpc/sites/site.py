"""One facility of a job file's ``sites:`` list: which party it runs, its batch system and what its jobs ask for.

Every value ends up in a shell script that runs on the facility: a newline in any of them could add a line of
its own, so none may hold one; names are plain words; environment values are quoted when the script is written
(``script.py``). Nothing here runs anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

_WORD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")  # [D-]HH:MM:SS, as sbatch --time takes it
_REACH = re.compile(r"^(local|ssh:[A-Za-z0-9_][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9.-]*(:\d{1,5})?)$")
# what a compute node without internet needs: Hugging Face libraries must not try the hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Site:
    """``name``: the party (of ``network.parties``) this facility's jobs run. ``scheduler``: slurm | pbs | flux.
    ``reach``: ``local`` (submit on this machine) or ``ssh:user@login-host``. ``partition``/``account``/``qos``,
    ``nodes``, ``tasks_per_node`` (ranks per node; more than one rank in all launches with the scheduler's
    launcher, e.g. srun), ``gpus_per_node``, ``cpus_per_task`` and ``time`` ([D-]HH:MM:SS) become directives;
    ``directives``: more of them as the site writes them (``--constraint=gpu``), ``setup``: shell lines before the
    launch (``module load ...``), ``env``: exported in the job, ``offline``: the Hugging Face offline variables.
    ``scheduler_env``: the environment of the submit commands on this machine (``SLURM_CONF`` of a second cluster).
    ``workdir``: where the job runs (default: the folder ``fedfleet sites run`` runs in), ``python``: the
    interpreter there (default: this one for a local site, ``python3`` over SSH), ``launcher``: replaces the
    scheduler's own, ``template``: a script template of the site's own (``docs/hpc.md``), ``poll_s``: how often
    the job's state is asked for (an update is picked up as soon as it is published, whatever this is).
    Over SSH, ``remote_dir`` is the site's folder (the job file, its copy of the exchange, the logs; the jobs'
    default working folder), ``ssh_key`` and ``ssh_options`` go to every ssh and rsync (``ssh.py``)."""

    name: str
    scheduler: Literal["slurm", "pbs", "flux"] = "slurm"
    reach: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str = "01:00:00"
    directives: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    offline: bool = True
    scheduler_env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    python: str | None = None
    launcher: str | None = None
    template: str | None = None
    poll_s: float = 10.0  # seconds between squeue calls for a job of this site (sites throttle busy pollers)
    # reach: ssh only
    remote_dir: str | None = None  # the site's folder for the job file, its copy of the exchange, logs, the jobs' cwd
    ssh_key: str | None = None  # the identity file (default: ssh's own choice, e.g. an agent)
    ssh_options: tuple[str, ...] = ()  # more ssh -o options: UserKnownHostsFile=..., ProxyJump=...

    def __post_init__(self) -> None:
        where = f"sites[{self.name}]"
        if not _WORD.match(str(self.name)):
            raise ValueError(f"sites: name {self.name!r} must be letters, digits, '.', '_' or '-' (a party's name)")
        if not _REACH.match(self.reach):
            raise ValueError(f"{where}.reach must be local or ssh:user@host, got {self.reach!r}")
        for key in ("partition", "account", "qos"):
            value = getattr(self, key)
            if value is not None and not _WORD.match(value):
                raise ValueError(f"{where}.{key} {value!r} must be one word (letters, digits, '.', '_', '-')")
        for key in ("nodes", "tasks_per_node"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise ValueError(f"{where}: gpus_per_node must be >= 0 and cpus_per_task >= 1")
        remote_only = [k for k in ("remote_dir", "ssh_key") if getattr(self, k) is not None]
        if self.ssh_options:
            remote_only.append("ssh_options")
        if self.reach == "local" and remote_only:
            raise ValueError(f"{where}.{remote_only[0]} applies to reach: ssh:user@host only")
        if self.reach != "local" and not (self.remote_dir or "").startswith("/"):
            raise ValueError(f"{where}.remote_dir: a site reached over SSH needs the absolute path of its folder there")
        if not 0.1 <= self.poll_s <= 3600:
            raise ValueError(f"{where}.poll_s must be between 0.1 and 3600 seconds, got {self.poll_s}")
        if not _TIME.match(self.time):
            raise ValueError(f"{where}.time must be [D-]HH:MM:SS (e.g. 02:00:00 or 1-12:00:00), got {self.time!r}")
        for table in ("env", "scheduler_env"):
            for key, value in getattr(self, table).items():
                if not _ENV_KEY.match(str(key)):
                    raise ValueError(f"{where}.{table}: {key!r} is not an environment variable name")
                if not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise ValueError(f"{where}.{table}.{key} must be a string or a number, got {value!r}")
        lines = {"directives": self.directives, "setup": self.setup, "ssh_options": self.ssh_options}
        single = {k: getattr(self, k) for k in ("workdir", "python", "launcher", "template", "remote_dir", "ssh_key")}
        values = [*(v for vs in lines.values() for v in vs), *(v for v in single.values() if v is not None)]
        values += [str(v) for table in (self.env, self.scheduler_env) for v in table.values()]
        for value in values:
            if "\n" in value or "\r" in value or "\0" in value:
                raise ValueError(f"{where}: {value!r} holds a line break: each value must be one line")

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def seconds(self) -> int:
        """``time`` in seconds."""
        days, hours, minutes, secs = _TIME.match(self.time).groups()  # type: ignore[union-attr]
        return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(secs)

    def job_env(self) -> dict[str, str]:
        """What the job exports: the offline variables (unless ``offline: false``), then the site's own."""
        return {**(OFFLINE_ENV if self.offline else {}), **{k: str(v) for k, v in self.env.items()}}
