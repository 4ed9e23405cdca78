"""The test process cannot hang after its summary: a blocked thread ends it with its stack printed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = """
import threading

def test_leaves_a_thread_blocked():
    threading.Thread(target=threading.Event().wait, name="stuck-forever").start()  # not a daemon: exit joins it
"""


@pytest.mark.parametrize("verdict", ["pass", "fail"])
def test_a_thread_blocked_at_exit_ends_the_run_with_its_stack(tmp_path, verdict):
    body = BLOCKED + ("" if verdict == "pass" else "\ndef test_fails():\n    assert False\n")
    (tmp_path / "test_blocked.py").write_text(body)
    env = {**os.environ, "FEDFLEET_TEST_EXIT_GRACE_S": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "did not exit within 1 s: a thread is blocked" in run.stderr
    assert "thread 'stuck-forever' (daemon: False)" in run.stderr  # the blocked thread, named, with its stack
    assert run.returncode == 1  # a passing run with a blocked thread fails; a failing one keeps its status
