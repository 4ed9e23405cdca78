"""docs/merge.md's examples do what the page says: its Python block makes the checkpoints, its commands merge
them, its tables list the options and server optimisers fedfleet has, its manifest has the keys fedfleet reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from safetensors import safe_open

from fedfleet.hpc.merge import MANIFEST, read_manifest, server_opt_names, state_file
from fedfleet.hpc.merge.manifest import FORMAT, KEYS
from tests.cli_runner import fedfleet
from tests.paths import ROOT

DOC = (ROOT / "docs" / "merge.md").read_text()


def block(kind: str) -> str:
    return re.findall(rf"```{kind}\n(.*?)```", DOC, re.S)[0]


def test_the_docs_checkpoints_and_commands_run(tmp_path):
    made = subprocess.run([sys.executable, "-c", block("python")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr
    commands = [line.split("#")[0].split() for line in block("bash").splitlines() if line.startswith("fedfleet ")]
    assert len(commands) == 4
    runs = [fedfleet(*cmd[1:], cwd=tmp_path) for cmd in commands]
    for cmd, run in zip(commands, runs, strict=True):
        assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stderr}"
    quoted = re.search(r"\(`(merged 2 checkpoints \(weights 0.75, 0.25\) into merged: 21 tensors), \.\.\.`\)", DOC)
    assert quoted and runs[0].stdout.startswith(quoted.group(1))
    assert read_manifest(tmp_path / "merged").merge["weights"] == [0.75, 0.25]
    shards = sorted((tmp_path / "merged-bf16").glob("model-*.safetensors"))
    assert len(shards) > 1
    with safe_open(str(shards[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert (tmp_path / "round-1" / state_file("m")).is_file() and (tmp_path / "round-1" / state_file("v")).is_file()
    assert (tmp_path / "round-1-adamw" / state_file("exp_avg_sq")).is_file()
    assert "norm of the delta: 21/21 tensors" in runs[3].stderr


def test_the_docs_tables_are_fedfleets_options_and_optimisers(tmp_path):
    help_text = fedfleet("merge", "--help", cwd=tmp_path).stdout
    options = re.findall(r"^\| `(--[a-z-]+)", DOC, re.M)
    assert len(options) == 9 and all(o in help_text for o in options)
    names = set()
    for cell in re.findall(r"^\| (`[a-z]+`(?:, `[a-z]+`)*) \| .* \| .* \|$", DOC, re.M):
        names.update(re.findall(r"`([a-z]+)`", cell))
    assert names == set(server_opt_names())


def test_the_docs_manifest_has_the_keys_fedfleet_reads(tmp_path):
    example = json.loads(block("json"))
    assert example["format"] == FORMAT and set(example) <= set(KEYS)
    del example["sha256"]  # the doc abbreviates the sums
    (tmp_path / MANIFEST).write_text(json.dumps(example))
    manifest = read_manifest(tmp_path)
    assert (manifest.party, manifest.tokens, manifest.samples) == ("site-a", 3_000_000, 12_000)
