"""FedScale's Taobao/DLRM guide on the user's own Taobao table: a csv with sparse and dense columns, the guide's
DLRM registered by the user's module, filter_less on the natural partition, and what data_map_file users are told."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import yaml

from fedfleet.config import load_job
from fedfleet.config.fedscale import FedScaleKeyWarning, from_fedscale
from tests.fedscale_helpers import BEHAVIOUR, CAPACITY, DIGITS, conf, fedfleet, load
from tests.paths import ROOT

EXAMPLE = ROOT / "examples" / "fedscale" / "taobao_conf.yml"
# the guide's table: raw_sample.csv joined with user_profile.csv and ad_feature.csv (its fllibs.py preprocessing);
# Taobao's own header has a trailing space in `new_user_class_level `
COLUMNS = ("userid", "time_stamp", "adgroup_id", "pid", "nonclk", "clk", "cms_segid", "cms_group_id",
           "final_gender_code", "age_level", "pvalue_level", "shopping_level", "occupation", "new_user_class_level ",
           "cate_id", "campaign_id", "customer", "brand", "price")  # fmt: skip


def taobao_csv(path, users: int = 16, seed: int = 0) -> int:
    """A Taobao-shaped click table (docs/coming-from-fedscale.md), seeded: users with 8-49 rows each, large ids,
    string pids, some blank brands."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in rng.choice(1_000_000, size=users, replace=False):
        profile = [rng.integers(0, 98), rng.integers(0, 13), rng.integers(1, 3), rng.integers(0, 7), rng.integers(1, 4),
                   rng.integers(1, 4), rng.integers(0, 2), rng.integers(1, 5)]  # fmt: skip
        taste = rng.integers(0, 4)  # the categories this user clicks
        for _ in range(rng.integers(8, 50)):
            cate = rng.integers(0, 12)
            clk = int(rng.random() < (0.6 if cate % 4 == taste else 0.1))
            ad = [rng.integers(1, 800_000), cate * 563 + 1, rng.integers(1, 400_000), rng.integers(1, 250_000)]
            brand = "" if rng.random() < 0.1 else str(rng.integers(1, 460_000))
            price = round(float(np.log1p(rng.lognormal(4.5, 1.2))), 4)  # log1p(price), as the docs write the table
            pid = rng.choice(["430548_1007", "430539_1007"])
            stamp = 1494000000 + rng.integers(0, 700_000)
            cms = [profile[0], profile[1], profile[2], profile[3], profile[4], profile[5], profile[6], profile[7]]
            rows.append([user, stamp, ad[0], pid, 1 - clk, clk, *cms, ad[1], ad[2], ad[3], brand, price])
    lines = [",".join(COLUMNS)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return len(rows)


def fedscale_home(tmp_path):
    """$FEDSCALE_HOME with the guide's device files (FedScale's trace pickles) where its conf.yml names them."""
    home = tmp_path / "FedScale"
    info = home / "benchmark" / "dataset" / "data" / "device_info"
    info.mkdir(parents=True)
    (info / "client_device_capacity").write_bytes(pickle.dumps(CAPACITY))
    (info / "client_behave_trace").write_bytes(pickle.dumps(BEHAVIOUR))
    return home


@pytest.fixture
def _restore_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")


def test_the_taobao_example_translates_to_the_users_csv_and_dlrm(tmp_path, monkeypatch, _restore_path):
    monkeypatch.setenv("FEDSCALE_HOME", str(fedscale_home(tmp_path)))
    with pytest.warns(FedScaleKeyWarning) as caught:
        report = from_fedscale(EXAMPLE)
    job = report.job
    assert job.imports == ("taobao_models",) and job.model.name == "taobao_dlrm"
    assert (job.data.dataset.name, job.data.dataset.params["key_column"]) == ("csv", "userid")
    assert (job.data.partition.name, job.data.partition.params, job.data.clients) == (
        "natural",
        {"min_samples": 21},
        None,
    )
    assert ("filter_less: 21", "data.partition.min_samples: 21 (clients outside are left out)") in report.mapped
    message = str(caught[0].message)
    assert "data_set: taobao: replaced by the dataset of the `fedfleet:` section" in message
    # the guide's DLRM keys chose fedfleet's dlrm, which the section replaces with the user's: named, not applied
    replaced = "model, sparse_feature_dim, bot_layer_sizes, top_layer_sizes: replaced by the `fedfleet:` section's"
    assert replaced in message
    assert not [m for m in report.mapped if m[0].startswith(("model:", "sparse_feature_dim"))]


@pytest.mark.slow
def test_the_taobao_example_runs_on_a_taobao_shaped_csv_from_the_command_line(tmp_path, monkeypatch):
    """The guide's conf.yml as shipped, shortened with --set: the user's table, the user's DLRM, FedScale's traces."""
    monkeypatch.setenv("FEDSCALE_HOME", str(fedscale_home(tmp_path)))
    taobao_csv(tmp_path / "taobao.csv")  # where the example reads it: the folder fedfleet runs from
    short = ["rounds=2", "cohort=4", "eval_every=1", "client.batch_size=32", f"output.dir={tmp_path / 'runs'}"]
    sets = [arg for item in [*short, "output.tensorboard=false"] for arg in ("--set", item)]
    # as a FedScale user runs it: no --from-fedscale, the file's job_conf: list says what it is
    out = fedfleet("simulate", "--quiet", str(EXAMPLE), *sets, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "is a FedScale job file (job_conf: list): translating it" in out.stderr
    assert "final test AUC:" in out.stdout and "simulated time:" in out.stdout
    assert "data_map_file" not in out.stderr and "taobao_dlrm" in out.stderr
    run = tmp_path / "runs" / "taobao"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert 0.0 < rows[-1]["test_auc"] < 1.0 and rows[-1]["clients"] == 4
    assert load_job(run / "config.yaml").data.partition.params == {"min_samples": 21}


# -- filter_less / filter_more ---------------------------------------------------------------------
def test_filter_less_and_filter_more_bound_a_natural_partition(tmp_path):
    path = conf(tmp_path, "data_set: movielens", "model: dlrm", "filter_less: 21", "filter_more: 1e15")
    report = load(path)
    assert report.job.data.partition.params == {"min_samples": 21, "max_samples": 10**15}
    assert not [key for key, _ in report.ignored if key.startswith("filter_")]
    path = conf(tmp_path, "data_set: movielens", "model: dlrm", "filter_less: 0")  # FedScale: size >= 0, everyone
    assert load(path).job.data.partition.params == {"min_samples": 1}


def test_filter_less_on_a_partition_that_sizes_its_own_clients_says_how_to_get_a_natural_one(tmp_path):
    with pytest.warns(FedScaleKeyWarning, match=r"filter_less: bounds a natural partition's clients .* this job's "
                      r"partition is iid.* key column and `partition: natural`"):  # fmt: skip
        report = from_fedscale(conf(tmp_path, *DIGITS, "filter_less: 21"))
    assert report.job.data.partition.params == {}


def test_the_fedfleet_sections_own_bound_wins_over_filter_less(tmp_path):
    extra = "fedfleet:\n  data: {partition: {name: natural, min_samples: 5}}\n"
    report = load(conf(tmp_path, "data_set: movielens", "model: dlrm", "filter_less: 21", extra=extra))
    assert report.job.data.partition.params == {"min_samples": 5}
    assert ("filter_less", "the `fedfleet:` section or --set gives data.partition.min_samples itself") in report.ignored


# -- data_map_file ---------------------------------------------------------------------------------
def test_data_map_file_is_answered_with_how_to_bring_ones_own_client_split(tmp_path):
    path = conf(tmp_path, *DIGITS, "data_map_file: $FEDSCALE_HOME/benchmark/dataset/data/femnist/client_data_mapping")
    with pytest.warns(FedScaleKeyWarning) as caught:
        from_fedscale(path)
    message = str(caught[0].message)
    assert "data_map_file: fedfleet does not read FedScale's sample-to-client map" in message
    assert "key_column: client_id}, partition: natural, clients: null}}" in message


def test_the_guide_shows_the_examples_section_and_the_tables_header():
    """docs/coming-from-fedscale.md's Taobao section is the example's `fedfleet:` section and the tested table."""
    doc = (ROOT / "docs" / "coming-from-fedscale.md").read_text()
    section = doc.split("The `fedfleet:` section of `taobao_conf.yml`:", 1)[1].split("```yaml\n", 1)[1]
    shown = yaml.safe_load(section.split("```", 1)[0])["fedfleet"]
    assert shown == yaml.safe_load(EXAMPLE.read_text())["fedfleet"]
    assert ",".join(c.strip() for c in COLUMNS) in doc.split("### The table: taobao.csv", 1)[1]
