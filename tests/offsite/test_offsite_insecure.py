"""An Offsite-Tuning YAML cannot turn TLS off by itself, as a job file cannot (``fedfleet.jobs.deploy.access_of``):
``insecure: true`` (or an empty ``certs``) needs ``--insecure`` on the command line too."""

import pytest

from fedfleet.cli.main import main
from fedfleet.config.offsite import load_job
from fedfleet.errors import ConfigError
from tests.offsite_yaml import side


@pytest.mark.parametrize("name", ["owner", "guest"])
def test_insecure_yaml_without_the_flag_is_refused_with_the_fix(tmp_path, capsys, name):
    path = side(tmp_path, name, insecure=True)
    assert main(["offsite", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedfleet: error: {path}: insecure: true asks for plaintext, but a job file cannot turn")
    assert "--insecure on the command line" in err and len(err.strip().splitlines()) == 1
    assert main(["offsite", str(path), "--dry-run", "--insecure"]) == 0


def test_empty_certs_without_the_flag_is_refused(tmp_path, capsys):
    path = side(tmp_path, "owner", insecure=False, certs=None)
    assert main(["offsite", str(path), "--dry-run"]) == 2
    assert "certs: is empty, which would mean plaintext" in capsys.readouterr().err
    assert main(["offsite", str(path), "--dry-run", "--insecure"]) == 0


def test_only_the_command_line_chooses_plaintext(tmp_path):
    job = load_job(side(tmp_path, "guest", insecure=True))
    with pytest.raises(ConfigError, match="cannot turn TLS off by itself"):
        job.certs_for(insecure=False)
    assert job.certs_for(insecure=True) is None
    tls = load_job(side(tmp_path, "guest", insecure=False, certs="my-certs"))
    assert tls.certs_for() == "my-certs"
    assert tls.certs_for(insecure=True) is None  # --insecure alone means plaintext, as for `fedfleet party`
