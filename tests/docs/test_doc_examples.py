"""The Python blocks of the docs that promise to run do run, as a user copies them (in a fresh folder)."""

import re
import subprocess
import sys

import pytest

from tests.paths import ROOT

# docs whose ```python blocks are complete programs (the others show fragments of a larger script)
RUNNABLE = ["text-data.md", "differential-privacy.md"]


def blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / name).read_text(), re.S)


@pytest.mark.parametrize("name", RUNNABLE)
def test_the_docs_python_blocks_run(name, tmp_path):
    found = blocks(name)
    assert found, f"docs/{name} has no python block"
    for code in found:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"docs/{name}:\n{code}\n{out.stderr}"


def test_text_data_prints_what_its_comments_say(tmp_path):
    out = subprocess.run([sys.executable, "-c", blocks("text-data.md")[0]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.stdout.splitlines()[0] == "['party_0.csv', 'party_1.csv'] test.csv"
    assert (tmp_path / "data" / "split" / "party_1.csv").read_text().startswith("text,label\n")
