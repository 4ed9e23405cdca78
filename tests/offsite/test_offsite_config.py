"""An Offsite-Tuning side's YAML goes through the job-file loader: typed values, did-you-mean keys, errors that name
the file and the key path, reported by ``fedfleet offsite`` as ``fedfleet offsite``'s siblings report theirs."""

import pytest
import yaml

from fedfleet.cli.main import main
from fedfleet.config import to_dict
from fedfleet.config.offsite import OffsiteJob, load_job, parse_job
from fedfleet.errors import ConfigError
from fedfleet.offsite import OffsitePlan
from fedfleet.sync.args import FedArguments
from tests.offsite_yaml import EXAMPLES, side


@pytest.mark.parametrize("name", ["owner", "guest", "host"])
def test_examples_load_typed_and_round_trip(name):
    job = load_job(EXAMPLES / f"{name}.yaml")
    assert isinstance(job.offsite, OffsitePlan) and job.offsite.emulator_layer_num == 2
    assert isinstance(job.fed, FedArguments) and job.fed.aggregate_strategy == "step" and job.fed.aggregate_freq == 4
    assert job.parties == (("guest", "9999"), ("host", "10000"), ("arbiter", "10000"))
    assert parse_job(to_dict(job)) == job


def test_a_typo_is_fedfleet_error_with_file_key_path_and_suggestion(tmp_path, capsys):
    path = side(tmp_path, training__max_step=3)
    assert main(["offsite", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedfleet: error: {path}: training.max_step: unknown key (did you mean 'max_steps'?)")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"training__learning_rate": "fast"}, "training.learning_rate: expected a number, got 'fast'"),
        ({"data__texts": 1.5}, "data.texts: expected a whole number, got 1.5"),
        ({"insecure": "yes"}, "insecure: expected true or false, got 'yes'"),
        ({"role": "gest"}, "role: 'gest' is not one of 'arbiter', 'guest', 'host'"),
        ({"parties": [["guest", "9999", "x"]]}, "parties[0]: expected a list of 2 values"),
        ({"fed__aggregate_strategy": "round"}, "fed.aggregate_strategy: 'round' is not one of 'epoch', 'step'"),
        ({"offsite__emulator_layer_num": 0}, "offsite: emulator_layer_num must be at least 1"),
        ({"lora": {"r": 0}}, "lora: lora r must be >= 1"),
        ({"model": None}, "give model (a config) or model_path"),
        ({"data__source": "sciq"}, "data.source: 'sciq' is not one of 'reviews', 'mmlu'"),
        ({"data": {"source": "mmlu", "texts": 300}}, "data: texts: MMLU has 281 questions, got 300"),
        ({"data__reasoning": True}, "data: reasoning: is for source: mmlu"),
        ({"data": {"share": 2, "shares": 2}}, "data: share must be one of 0 .. 1 (shares: 2), got 2"),
    ],
)
def test_a_bad_value_names_the_key(tmp_path, changes, message):
    path = side(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_numbers_where_yaml_reads_ids_and_deepspeed_as_a_path(tmp_path):
    path = side(tmp_path, party_id=9999, parties=[["guest", 9999], ["arbiter", 10000]], training__deepspeed="ds.json")
    job = load_job(path)
    assert job.party_id == "9999" and job.parties == (("guest", "9999"), ("arbiter", "10000"))
    assert job.training.deepspeed == "ds.json"
    assert job.training.learning_rate == 0.01 and isinstance(job.training.learning_rate, float)


def test_unknown_model_type_is_a_config_error():
    job = parse_job({**yaml.safe_load((EXAMPLES / "guest.yaml").read_text()), "model": {"model_type": "gpt9"}})
    assert isinstance(job, OffsiteJob)
    with pytest.raises(ConfigError, match=r"model\.model_type: unknown 'gpt9'"):
        job.model_config()


def test_dry_run_builds_the_data_a_run_would_and_fails_where_it_would(tmp_path, capsys):
    path = side(tmp_path, data={"source": "mmlu", "texts": 40, "held_out": 8, "block": 128})
    assert main(["offsite", str(path), "--dry-run", "--insecure"]) == 2
    assert "data.block: 128 tokens, but the model reads at most 64 positions" in capsys.readouterr().err
    assert main(["offsite", str(side(tmp_path, data={"source": "mmlu", "block": 64})), "--dry-run", "--insecure"]) == 0


def test_dry_run_prints_the_resolved_job(capsys):
    assert main(["offsite", str(EXAMPLES / "owner.yaml"), "--dry-run", "--insecure"]) == 0  # its insecure: true
    printed = yaml.safe_load(capsys.readouterr().out)
    assert parse_job(printed) == load_job(EXAMPLES / "owner.yaml")
