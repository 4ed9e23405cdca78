"""Ranks from the batch scheduler, so ``srun python train.py`` is the whole launch line (no torchrun).

torch.distributed's ``env://`` start reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. torchrun sets them by running a TCP rendezvous agent per node, which xFFL had to bypass past
128 nodes. A scheduler already knows every rank's place: ``set_launch_env`` copies it into those variables.
Variables already set (by torchrun, or by the user) win: nothing is overwritten.

SLURM, from an ``srun`` step (the step's variables, so a step smaller than the allocation is right):
``SLURM_PROCID`` -> RANK, ``SLURM_STEP_NUM_TASKS`` -> WORLD_SIZE, ``SLURM_LOCALID`` -> LOCAL_RANK, this node's
count in ``SLURM_STEP_TASKS_PER_NODE`` -> LOCAL_WORLD_SIZE, the first host of ``SLURM_STEP_NODELIST`` ->
MASTER_ADDR, and a port derived from the job and step ids and the cluster's name -> MASTER_PORT. A batch script's
own process (not started by srun) is one rank, whatever ``SLURM_NTASKS`` says: it would otherwise wait for ranks
that never start.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

PORT_BASE, PORT_SPAN = 10000, 20000  # below Linux's ephemeral ports (32768+), so a derived port is rarely taken


@dataclass(frozen=True)
class Ranks:
    """Where this process sits, as torch.distributed's ``env://`` start wants it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def variables(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``lrdn[0101-0104,0230]`` -> ``lrdn0101``, ``a[1-2]-ib[3-4],b`` ->
    ``a1-ib3`` (zero padding kept)."""
    text = nodelist.strip()
    if not text:
        raise ValueError("an empty host list")
    depth, end = 0, len(text)
    for i, char in enumerate(text):  # the first top-level item: commas inside brackets separate ranges
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    item = text[:end]

    def first(match: re.Match) -> str:
        return re.split(r"[,-]", match.group(1))[0]

    host = re.sub(r"\[([^\]]*)\]", first, item)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the host list {nodelist!r}")
    return host


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Node ``node``'s task count in SLURM's compressed form: ``2(x3),1`` is 2, 2, 2, 1."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot read the tasks per node {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node < len(counts):
        raise ValueError(f"node {node} is not in the tasks per node {tasks_per_node!r}")
    return counts[node]


def derived_port(job_id: int, step_id: int, cluster: str = "") -> int:
    """A port every rank of one step computes alike, distinct for the steps of one job and for nearby jobs; the
    cluster's name shifts it, so two clusters sharing hosts (job ids from 1 on each) do not pick the same one."""
    return PORT_BASE + (job_id * 8 + step_id + zlib.crc32(cluster.encode())) % PORT_SPAN


def slurm_ranks(env: MutableMapping[str, str]) -> Ranks | None:
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
            log.warning(
                "SLURM_NTASKS=%s, but this process was not started by srun: it runs as one rank (launch the "
                "script with srun to start all of them)",
                env["SLURM_NTASKS"],
            )
        return None
    try:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        node = int(env.get("SLURM_NODEID", "0"))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        hosts = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        return Ranks(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=tasks_on_node(per_node, node),
            master_addr=first_host(hosts),
            master_port=derived_port(
                int(env.get("SLURM_JOB_ID", "0")), int(env["SLURM_STEP_ID"]), env.get("SLURM_CLUSTER_NAME", "")
            ),
            launcher="srun",
        )
    except (KeyError, ValueError) as exc:
        why = f"SLURM's variables do not describe this rank ({exc}); launch with srun or torchrun"
        raise RuntimeError(why) from None


# launcher -> how to read its ranks (a scheduler more is a row here); the first that recognises the process wins
LAUNCHERS: dict[str, Callable[[MutableMapping[str, str]], Ranks | None]] = {"slurm": slurm_ranks}


def scheduler_ranks(env: MutableMapping[str, str] | None = None) -> Ranks | None:
    """This process's ranks as its scheduler started it, or None when no known scheduler did."""
    env = os.environ if env is None else env
    for read in LAUNCHERS.values():
        ranks = read(env)
        if ranks is not None:
            return ranks
    return None


def set_launch_env(env: MutableMapping[str, str] | None = None) -> Ranks | None:
    """Fill torch.distributed's variables from the scheduler where torchrun (or the user) has not set them.

    Returns the ranks it read, or None when the process was started by torchrun (``WORLD_SIZE`` is set) or by no
    known scheduler. Safe to call more than once."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return None
    ranks = scheduler_ranks(env)
    if ranks is None:
        return None
    for key, value in ranks.variables().items():
        env.setdefault(key, value)  # a MASTER_PORT the user exported stays theirs
    return ranks
