"""runtime.threads: one torch thread for small models on a CPU by default (benchmarks/threads.py says why)."""

import pytest
import torch
from torch import nn

from fedfleet.config.loader import parse
from fedfleet.config.schema import JobConfig
from fedfleet.errors import ConfigError
from fedfleet.jobs.assemble import ONE_THREAD_BELOW, set_threads
from fedfleet.jobs.simulation import Simulation

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as torch starts on a 2-core machine
    yield
    torch.set_num_threads(threads)


def test_auto_is_one_thread_for_a_small_model_and_leaves_a_large_one_alone():
    assert set_threads(None, nn.Linear(10, 10), CPU) == 1
    torch.set_num_threads(2)
    large = nn.Linear(1, ONE_THREAD_BELOW)  # 2 x ONE_THREAD_BELOW params, lazily allocated by the OS
    assert set_threads(None, large, CPU) == 2
    assert set_threads(None, nn.Linear(10, 10), torch.device("cuda")) == 2  # GPU training: CPU threads untouched


def test_a_given_count_and_omp_num_threads_win(monkeypatch):
    assert set_threads(2, nn.Linear(10, 10), CPU) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(None, nn.Linear(10, 10), CPU) == 2


def test_the_job_config_sets_them(tmp_path):
    job = {"data": {"dataset": "digits", "clients": 4}, "cohort": 2, "rounds": 1, "output": {"dir": str(tmp_path)}}
    Simulation.from_config(parse(JobConfig, job))
    assert torch.get_num_threads() == 1
    Simulation.from_config(parse(JobConfig, {**job, "runtime": {"threads": 2}}))
    assert torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match=r"runtime.threads"):
        parse(JobConfig, {**job, "runtime": {"threads": 0}})
