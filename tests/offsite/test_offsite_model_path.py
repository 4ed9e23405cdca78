"""A ``save_pretrained`` folder as the model: ``AutoMainModel("<dir>")`` and a side's ``model_path:``, and a
``--dry-run`` that builds what the run builds (so a folder the run cannot load fails the dry run too)."""

import pytest
import torch
from transformers import GPT2LMHeadModel

from fedfleet.cli.main import main as fedfleet
from fedfleet.cli.offsite import build_main
from fedfleet.config.offsite import load_job
from fedfleet.errors import ConfigError
from fedfleet.offsite import AutoMainModel, AutoSubModel
from tests.offsite_helpers import tiny_config
from tests.offsite_yaml import side


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(6))
    model.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2", model


def same_weights(a, b):
    theirs = dict(b.named_parameters())
    return all(torch.equal(p, theirs[n]) for n, p in a.named_parameters())


def test_auto_models_take_a_save_pretrained_folder(saved):
    folder, model = saved
    for source in (str(folder), folder):
        main = AutoMainModel(source, 2, 1, 1)
        assert same_weights(main.model, model)
    sub = AutoSubModel(str(folder), 2, 1, 1)
    assert len(sub.blocks) == 4


def test_a_folder_without_weights_is_named(tmp_path):
    tiny_config(4).save_pretrained(tmp_path / "config-only")
    with pytest.raises(ConfigError, match=r"cannot load a model from .*config-only"):
        AutoMainModel(str(tmp_path / "config-only"), 1, 1, 1)
    with pytest.raises(ConfigError, match=r"cannot read a model config from .*nothing"):
        AutoMainModel(str(tmp_path / "nothing"), 1, 1, 1)


@pytest.mark.parametrize("name", ["owner", "guest"])
def test_model_path_in_a_side_yaml_and_its_dry_run(tmp_path, saved, capsys, name):
    folder, model = saved
    path = side(tmp_path, name, model=None, model_path=str(folder))
    assert fedfleet(["offsite", str(path), "--dry-run", "--insecure"]) == 0
    if name == "owner":
        assert same_weights(build_main(load_job(path)).model, model)  # what the run hands out from
    capsys.readouterr()
    tiny_config(6).save_pretrained(tmp_path / "config-only")
    broken = side(tmp_path, name, model=None, model_path=str(tmp_path / "config-only"))
    expected = 2 if name == "owner" else 0  # a data owner reads only the config: its weights come from the owner
    assert fedfleet(["offsite", str(broken), "--dry-run", "--insecure"]) == expected
    if name == "owner":
        assert "cannot load a model from" in capsys.readouterr().err
