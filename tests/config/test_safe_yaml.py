"""Job files that would exhaust memory or the parser's recursion are refused at once, with the file named."""

import time

import pytest

from fedfleet.config import load_job
from fedfleet.config.safe_yaml import load_yaml
from fedfleet.errors import ConfigError

LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["name: x"]
)


def test_a_billion_laughs_job_file_is_refused_in_well_under_a_second(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(LAUGHS)
    assert len(LAUGHS) < 600  # a few hundred bytes, 9^9 strings once expanded
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: not valid YAML: its aliases expand to more than"):
        load_job(path)
    assert time.monotonic() - started < 1.0


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_job(path)


def test_ordinary_anchors_still_work():
    doc = load_yaml("base: &b {lr: 0.1, epochs: 2}\nclient: *b\nlist: [*b, *b]\n")
    assert doc["client"] == {"lr": 0.1, "epochs": 2} and doc["list"][1]["epochs"] == 2
    with pytest.raises(Exception, match="contains it"):
        load_yaml("a: &a [*a]")
