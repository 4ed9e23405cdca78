"""Ranks from SLURM's variables (fedfleet.hpc.launch), with the variables a real srun step and batch step set
(recorded from the test cluster of tests/hpc/slurm/); the real srun launch is tests/hpc/slurm/test_srun_fsdp.py."""

from __future__ import annotations

import logging

import pytest

from fedfleet.hpc.launch import derived_port, first_host, scheduler_ranks, set_launch_env, tasks_on_node

# what srun set for rank 1 of a 2-task step on the one-node test cluster (job 1, step 0)
SRUN_STEP = {
    "SLURM_JOB_ID": "1",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "vm",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2",
}
# what the batch script's own process sees in the same job: no step, but SLURM_NTASKS=2
BATCH_STEP = {k: v for k, v in SRUN_STEP.items() if "STEP" not in k} | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("vm", "vm"),
        ("lrdn[0101-0104,0230]", "lrdn0101"),
        ("nid[005012,005020-005023]", "nid005012"),
        ("gpu07,gpu[09-10]", "gpu07"),
        ("rack[2-3]-node[01-04],login1", "rack2-node01"),
        ("a-b.c[7]", "a-b.c7"),
    ],
)
def test_the_first_host_of_a_compressed_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "node[01-04", "node]"])
def test_a_host_list_that_cannot_be_read_is_refused(bad):
    with pytest.raises(ValueError):
        first_host(bad)


def test_tasks_per_node_in_slurms_compressed_form():
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("4", 0) == 4
    with pytest.raises(ValueError, match="node 4"):
        tasks_on_node("2(x3),1", 4)


def test_an_srun_rank_gets_torchs_variables():
    env = dict(SRUN_STEP)
    ranks = set_launch_env(env)
    assert ranks is not None and ranks.launcher == "srun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("1", "2", "1", "2")
    assert env["MASTER_ADDR"] == "vm" and env["MASTER_PORT"] == str(derived_port(1, 0))


def test_every_rank_of_a_step_agrees_on_the_port_and_steps_of_one_job_differ():
    ports = {scheduler_ranks({**SRUN_STEP, "SLURM_PROCID": str(r)}).master_port for r in range(2)}
    assert len(ports) == 1
    assert derived_port(1234, 0) != derived_port(1234, 1) != derived_port(1235, 1)
    assert derived_port(1, 0, "facility-a") != derived_port(1, 0, "facility-b")  # two test clusters, one host
    assert all(10000 <= derived_port(j, s) < 30000 for j in (1, 99_999_999) for s in (0, 7))


def test_a_step_of_two_nodes_reads_this_nodes_count():
    env = {**SRUN_STEP, "SLURM_STEP_NODELIST": "lrdn[0101-0102]", "SLURM_STEP_TASKS_PER_NODE": "4,3"}
    env.update(SLURM_STEP_NUM_TASKS="7", SLURM_NODEID="1", SLURM_PROCID="5", SLURM_LOCALID="1")
    ranks = scheduler_ranks(env)
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size) == (5, 7, 1, 3)
    assert ranks.master_addr == "lrdn0101"


def test_torchruns_variables_and_the_users_port_win():
    env = {**SRUN_STEP, "WORLD_SIZE": "8", "RANK": "3"}
    assert set_launch_env(env) is None and env["RANK"] == "3" and "MASTER_ADDR" not in env
    env = {**SRUN_STEP, "MASTER_PORT": "29500"}
    set_launch_env(env)
    assert env["MASTER_PORT"] == "29500" and env["RANK"] == "1"


def test_the_batch_scripts_own_process_is_one_rank_and_is_told_to_use_srun(caplog):
    env = dict(BATCH_STEP)
    with caplog.at_level(logging.WARNING, logger="fedfleet.hpc.launch"):
        assert set_launch_env(env) is None
    assert "WORLD_SIZE" not in env
    assert "not started by srun" in caplog.text


def test_no_scheduler_no_change():
    env = {"HOME": "/root"}
    assert set_launch_env(env) is None and env == {"HOME": "/root"}


def test_a_step_without_a_host_list_names_the_problem():
    env = {k: v for k, v in SRUN_STEP.items() if "NODELIST" not in k}
    with pytest.raises(RuntimeError, match=r"SLURM_JOB_NODELIST.*srun or torchrun"):
        set_launch_env(env)
