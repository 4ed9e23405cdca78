"""docs/hpc.md's sites section as a user copies it: the example job renders the script the page shows, and the
page's annotated sites: entry is a valid job file section."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import yaml

from fedfleet.config import load_job
from tests.paths import ROOT

PAGE = ROOT / "docs" / "hpc.md"


def section() -> str:
    text = PAGE.read_text()
    return text[text.index("## Facilities in the job file") : text.index("## After training")]


def test_the_pages_script_is_what_fedfleet_sites_render_prints_for_the_example(tmp_path):
    shown = re.findall(r"```bash\n(.*?)```", section(), re.S)[0]
    shutil.copy(ROOT / "examples" / "hpc" / "two_sites.yaml", tmp_path / "two_sites.yaml")
    done = subprocess.run([sys.executable, "-m", "fedfleet.cli.main", "sites", "render", "two_sites.yaml", "--site",
                           "leonardo"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.replace(str(tmp_path), "/work/me") == shown
    assert subprocess.run(["bash", "-n"], input=done.stdout, text=True).returncode == 0


def test_the_pages_sites_entry_is_a_valid_job_section(tmp_path):
    block = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section(), re.S)[0])
    (tmp_path / "leonardo.sh.in").write_text("#!/bin/bash\n@{directives}\n@{command}\n")
    job = {"rounds": 2, "cohort": 2, "model": {"name": "mlp"}, "data": {"dataset": "digits", "clients": 2}, **block}
    job["sites"].append({"name": "lumi"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    loaded = load_job(path)
    assert [s.name for s in loaded.sites] == ["leonardo", "lumi"]
    assert loaded.sites[0].scheduler_env == {"SLURM_CONF": "/etc/slurm-b/slurm.conf"}
