"""The offsite command's module entry point reports errors as fedfleet does."""

import subprocess
import sys

from tests.offsite_yaml import side


def test_python_m_entry_reports_like_fedfleet(tmp_path):
    path = side(tmp_path, offsite__emulator_layers=2)
    out = subprocess.run(
        [sys.executable, "-m", "fedfleet.cli.offsite", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.startswith(
        f"fedfleet: error: {path}: offsite.emulator_layers: unknown key (did you mean 'emulator_layer_num'?)"
    )
    assert "Traceback" not in out.stderr
