"""docs/robust-aggregation.md's examples do what the page says."""

import logging
import re

import pytest
import yaml

from fedfleet.config import parse
from fedfleet.config.schema import JobConfig
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.transforms import JobFacts, build_pipeline
from tests.paths import ROOT

DOC = (ROOT / "docs" / "robust-aggregation.md").read_text()


def the_job(tmp_path, **changes) -> JobConfig:
    data = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", DOC, re.S)[0])
    data.update(output={"dir": str(tmp_path)}, **changes)
    return parse(JobConfig, data)


def test_the_docs_job_learns_with_the_defence_and_not_without(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    defended = Simulation.from_config(the_job(tmp_path)).loop.run()[-1].metrics
    assert defended["test_accuracy"] > 0.6 and defended["train_robust_dist_max"] > 0
    job = the_job(tmp_path)
    bare = the_job(tmp_path, transforms={"client": [dict(job.transforms.client[0].params, name="gaussian")]})
    assert bare.transforms.server == ()
    assert Simulation.from_config(bare).loop.run()[-1].metrics["test_accuracy"] < 0.3


def test_the_docs_python_and_error_lines_are_what_fedfleet_does():
    code = re.findall(r"```python\n(.*?)```", DOC, re.S)[0]
    exec(compile(code, "docs/robust-aggregation.md", "exec"), {})
    line = re.search(r"^transforms.server 'bulyan'.*$", DOC, re.M).group(0)
    with pytest.raises(ConfigError, match="^" + re.escape(line) + "$"):
        build_pipeline(server=[("bulyan", {"f": 2})], job=JobFacts(cohort=10))
