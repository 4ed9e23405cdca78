"""The examples the README shows run as written."""

import subprocess
import sys

import pytest

from tests.paths import ROOT


def test_custom_model_example_runs_and_learns(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_model.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.strip().splitlines()[-1].split(": ")[1].rstrip("%")) / 100
    assert accuracy > 0.7  # three balanced classes: chance is 1/3
    assert (tmp_path / "custom_model.safetensors").is_file()


def test_readme_example_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    body = (ROOT / "examples" / "custom_model.py").read_text().split('"""', 2)[2].strip()
    assert body in readme


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_passes_its_checks(path, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedfleet.cli.main", "simulate", str(path), "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "# ok:" in out.stderr
