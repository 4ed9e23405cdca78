"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd as plain background processes.

Everything a cluster writes (config, munge key and socket, pid files, logs, spool, saved state) lives under one
folder, so two clusters run side by side on one machine (own name, partition, ports, munge socket): stand-ins for
two facilities. The settings are those of /work/shared/hpc-slurm-notes.md (checked on Debian 12, SLURM 22.05):
no cgroups (``proctrack/linuxproc``, ``task/none``), no accounting, so a job's end is read from ``squeue`` and
``scontrol show job``, never ``sacct`` (it fails without accounting).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "munge", "unmunge")
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}


def missing_binaries() -> list[str]:
    """The SLURM and munge programs not found (daemons live in /usr/sbin, which a user's PATH may lack)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install slurmctld slurmd slurm-client munge")
    return found


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text[-lines:])


def _alive(proc: subprocess.Popen) -> bool:
    """Running, and not a zombie (some inits leave stopped daemons as zombies for a few seconds)."""
    if proc.poll() is not None:
        return False
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class SlurmCluster:
    """One cluster of one node (``hostname -s`` at 127.0.0.1) offering ``cpus`` CPUs, whatever the machine has
    (``SlurmdParameters=config_overrides``), in partition ``partition`` (default ``<name>-part``)."""

    def __init__(
        self,
        root: Path,
        name: str,
        ctld_port: int,
        d_port: int,
        partition: str | None = None,
        cpus: int = 4,
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.ctld_port = ctld_port
        self.d_port = d_port
        self.partition = partition or f"{name}-part"
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    # -- the environment clients need -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """os.environ with this cluster's ``SLURM_CONF``, without any SLURM_* variables inherited from an
        enclosing job (they would point srun at another job's allocation)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
        return env

    def command(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client (sbatch, squeue, scontrol, srun, ...) against this cluster."""
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        """Write the config, start the three daemons, each only after the one before answers; on a daemon that
        does not come up within ``timeout`` s, stop what was started and raise with the logs' tails."""
        try:
            self._write_files()
            self._start_munged(timeout)
            self._start_daemon("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            self._ready("slurmctld", timeout, self._ctld_up)
            self._start_daemon("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._ready("slurmd", timeout, self._node_idle)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10) -> None:
        """Stop the daemons this object started (its own PIDs only), last started first; SIGKILL a straggler."""
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- jobs -------------------------------------------------------------------------------------------------
    def sbatch(
        self, script_path: Path | str, *args: str, options: Sequence[str] = (), cwd: Path | str | None = None
    ) -> str:
        """Submit ``script_path`` with script arguments ``args`` and sbatch ``options`` (e.g. ``--ntasks=2``,
        ``--output=...``) to this cluster's partition; the job id."""
        argv = ["sbatch", "--parsable", f"--partition={self.partition}"]
        if cwd is not None:
            argv.append(f"--chdir={cwd}")
        done = self.command(*argv, *options, str(script_path), *args)
        return done.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, NodeList, ...); finished jobs stay for
        ``MinJobAge`` (an hour here)."""
        out = self.command("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields: dict[str, str] = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:  # the first JobState=..., not a later Reason=... echo
                fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float = 120) -> tuple[str, int]:
        """Wait for the job to end: its final state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) and exit code
        (the script's status, or 128 + signal when a signal ended it). Polls ``squeue`` (sacct needs
        accounting, which is off; ``sbatch --wait`` returns some 7 s late)."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            state = self.command("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip()
            if state not in ACTIVE:
                fields = self.job(job_id)
                final = fields.get("JobState", state or "UNKNOWN")
                if final not in ACTIVE:
                    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
                    status = int(code or 0)
                    return final, status if status or not int(sig or 0) else 128 + int(sig)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} on {self.name} still {state or '?'} after {timeout} s; slurmd log:\n"
                    + _tail(self._logs.get("slurmd", self.root / "log" / "slurmd.log"))
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)  # quick for short jobs, cheap for long ones

    def cancel(self, job_id: str) -> None:
        self.command("scancel", str(job_id))

    # -- internals --------------------------------------------------------------------------------------------
    def _write_files(self) -> None:
        for sub in ("etc", "munge", "run", "log", "spool/ctld", "spool/d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged wants a key only its owner reads, and a socket folder others can traverse
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        hw = self._hardware()
        run, log, spool = self.root / "run", self.root / "log", self.root / "spool"
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={spool / 'ctld'}",
            f"SlurmdSpoolDir={spool / 'd'}",
            f"SlurmctldPidFile={run / 'slurmctld.pid'}",
            f"SlurmdPidFile={run / 'slurmd.pid'}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdLogFile={log / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",  # no cgroups on a test machine
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MailProg=/bin/true",
            "SchedulerParameters=batch_sched_delay=0",  # else batch jobs start on 3 s ticks
            "MinJobAge=3600",  # finished jobs stay visible to scontrol: how wait() reads their end
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the node may offer more CPUs than the machine has
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 "
            f"CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={hw.get('RealMemory', '1000')} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES State=UP MaxTime=INFINITE",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @staticmethod
    def _hardware() -> dict[str, str]:
        """``slurmd -C``'s reading of this machine (we keep only its memory; CPUs are ours to choose)."""
        try:
            out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        return dict(w.split("=", 1) for w in out.split() if "=" in w)

    def _start_daemon(self, name: str, argv: list[str]) -> None:
        log = self.root / "log" / f"{name}.out"
        self._logs.setdefault(name, self.root / "log" / f"{name}.log")
        with open(log, "ab") as out:  # the daemon's own stdout/stderr (errors before its log file opens)
            self._procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _start_munged(self, timeout: float) -> None:
        m = self.root / "munge"
        self._logs["munged"] = m / "munged.log"
        # --force: munged refuses a socket whose parent folders others cannot traverse (pytest's tmp folders are
        # 0700); every client here runs as root, so that check guards no one
        argv = [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}"]
        argv += [f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"]
        self._start_daemon("munged", argv)
        self._ready("munged", timeout, self._munge_works)

    def _munge_works(self) -> bool:
        sock = f"--socket={self.munge_socket}"
        try:
            cred = subprocess.run([_which("munge"), sock, "-n"], capture_output=True, timeout=5)
            if cred.returncode != 0:
                return False
            back = subprocess.run([_which("unmunge"), sock], input=cred.stdout, capture_output=True, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return back.returncode == 0

    def _ctld_up(self) -> bool:
        return "UP" in self.command("scontrol", "ping", check=False, timeout=10).stdout

    def _node_idle(self) -> bool:
        out = self.command("sinfo", "-h", "-n", self.node, "-o", "%T", check=False, timeout=10).stdout
        return out.strip() == "idle"

    def _ready(self, name: str, timeout: float, check) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            proc = self._procs[name]
            if not _alive(proc) or time.monotonic() > deadline:
                why = f"exited with {proc.poll()}" if not _alive(proc) else f"not ready after {timeout} s"
                raise RuntimeError(
                    f"{name} of cluster {self.name} {why}\n--- {name} output:\n"
                    + _tail(self.root / "log" / f"{name}.out")
                    + f"\n--- {name} log:\n"
                    + _tail(self._logs[name])
                )
            time.sleep(0.1)
