"""docs/fsdp.md's example runs as a user copies it: its script, and its shell block with torchrun (on free ports)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.grpc_jobs import free_port
from tests.paths import ROOT

pytestmark = pytest.mark.slow


def test_the_fsdp_docs_example_runs_two_parties_of_two_ranks(tmp_path):
    text = (ROOT / "docs" / "fsdp.md").read_text()
    script = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    shell = re.findall(r"```bash\n(.*?)```", text, re.S)[0]
    (tmp_path / "fsdp_party.py").write_text(script.replace("50551", str(free_port())))  # the arbiter's port
    for port in ("29601", "29602"):  # each party's rendezvous
        shell = shell.replace(port, str(free_port()))
    bin_dir = os.path.dirname(sys.executable)  # the venv's python and torchrun, as an activated venv gives them
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src")}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.splitlines()
    for name in ("guest-9999", "host-10000"):
        synced = [line for line in lines if line.startswith(f"{name}: synced")]
        assert [line.split(",")[0] for line in synced] == [
            f"{name}: synced after step 4",
            f"{name}: synced after step 8",
        ]
        assert all(", weight 64," in line for line in synced)
    assert any(line.startswith("global params in") for line in lines), out.stdout[-2000:] + out.stderr[-4000:]
    saved = load_file(tmp_path / "global" / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" in saved and saved["model.embed_tokens.weight"].shape == (256, 64)
