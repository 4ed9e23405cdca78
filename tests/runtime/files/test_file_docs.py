"""docs/file-exchange.md's example runs as a user copies it, and prints what its comments say."""

import re
import subprocess
import sys

from tests.paths import ROOT


def test_the_file_exchange_example_runs(tmp_path):
    page = (ROOT / "docs" / "file-exchange.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[3.0, 3.0]", "['guest-9999', 'host-10000', 'host-10001']"]
    # the keys the page's table lists are the schema's
    for key in ("exchange", "keep_last"):
        assert f"`runtime.{key}`" in page
