"""A user's own model and dataset, registered in a module of their own and named by the job file or --import:
what FedScale users do by editing fllibs.py."""

import sys

import pytest

from fedfleet.cli.main import main
from fedfleet.config import load_job
from fedfleet.config.imports import import_user_modules
from fedfleet.errors import ConfigError

MODULE = '''
import torch
from torch import nn

from fedfleet.data import DATASETS, from_tensors
from fedfleet.models import MODELS


@DATASETS.register("{tag}_blobs")
def blobs(num_samples: int = 200):
    """Two Gaussian blobs in 4 dimensions: the factory returns a Dataset (x float32 (N, ...), y int64 (N,))."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (num_samples,), generator=g)
    x = torch.randn(num_samples, 4, generator=g) + 2.0 * y[:, None]
    return from_tensors(x, y, 2, name="blobs")


@MODELS.register("{tag}_tiny")
def tiny(input_shape, num_classes, hidden: int = 8):
    """A model factory receives the input shape (without the batch) and the number of classes, then its keys."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''

JOB = """\
name: own
rounds: 2
cohort: 2
eval_every: 1
{imports}data: {{dataset: {tag}_blobs, clients: 4}}
model: {{name: {tag}_tiny, hidden: 16}}
client: {{epochs: 1, batch_size: 16, lr: 0.1}}
output: {{dir: {runs}, progress: false, tensorboard: false}}
"""


def write(tmp_path, tag, in_job: bool):
    (tmp_path / f"{tag}_models.py").write_text(MODULE.format(tag=tag))
    imports = f"imports: [{tag}_models]\n" if in_job else ""
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(imports=imports, tag=tag, runs=tmp_path / "runs"))
    return job


@pytest.fixture(autouse=True)
def _restore_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")


def test_a_job_file_names_the_module_next_to_it_that_registers_its_model_and_dataset(tmp_path, capsys):
    job = write(tmp_path, "injob", in_job=True)
    assert main(["simulate", str(job), "--overwrite"]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert load_job(job).imports == ("injob_models",)


def test_import_on_the_command_line_does_the_same(tmp_path, capsys):
    job = write(tmp_path, "oncli", in_job=False)
    assert main(["simulate", str(job), "--import", "oncli_models", "--overwrite"]) == 0
    assert "final test accuracy" in capsys.readouterr().out


def test_a_missing_or_broken_module_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no module 'nowhere_models'"):
        import_user_modules(["nowhere_models"], near=tmp_path / "job.yaml")
    (tmp_path / "broken_models.py").write_text("raise RuntimeError('my bug')\n")
    with pytest.raises(ConfigError, match="importing broken_models failed: RuntimeError: my bug"):
        import_user_modules(["broken_models"], near=tmp_path / "job.yaml")
    (tmp_path / "needs_models.py").write_text("import not_installed_pkg\n")
    with pytest.raises(ConfigError, match="needs_models imports 'not_installed_pkg', which is not installed"):
        import_user_modules(["needs_models"], near=tmp_path / "job.yaml")
    with pytest.raises(ConfigError, match="not a module name"):
        import_user_modules(["../evil.py"])
