import pytest

from fedfleet.config import JobConfig, Named, load_job, to_dict
from fedfleet.config.loader import apply_overrides, parse
from fedfleet.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_demo():
    job = load_job()
    assert job.data.dataset == Named("digits")
    assert job.data.partition == Named("dirichlet", {"alpha": 0.5})
    assert job.model == Named("simple_cnn", {"padding": 1})


def test_yaml_parsed_into_typed_objects(tmp_path):
    job = load_job(write(tmp_path, "rounds: 3\nstrategy: {name: fedyogi, server_lr: 0.1}\nclient: {lr: 1}\n"))
    assert isinstance(job, JobConfig)
    assert job.rounds == 3
    assert job.strategy == Named("fedyogi", {"server_lr": 0.1})
    assert job.client.lr == 1.0 and isinstance(job.client.lr, float)


def test_typo_key_names_the_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"client\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_job(write(tmp_path, "client:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"^roundz: unknown key \(did you mean 'rounds'\?\)"):
        load_job(write(tmp_path, "roundz: 3\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("client: {lr: -0.1}", r"client: client\.lr must be > 0, got -0\.1"),
        ("rounds: three", r"rounds: expected a whole number"),
        ("runtime: {vectorize: maybe}", r"runtime\.vectorize: 'maybe' is not one of"),
        ("data: {test_fraction: 1.5}", r"test_fraction must be in \[0, 1\)"),
        ("name: 'a b'", r"name 'a b' must be letters"),
        ("output: {tensorboard: 1}", r"output\.tensorboard: expected true or false"),
        ("model: {padding: 1}", r"model: expected a name or a mapping with a 'name' key"),
    ],
)
def test_bad_values_are_clear(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_job(write(tmp_path, text + "\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(write(tmp_path, "rounds: [1,\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_job(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_dotted_and_typed():
    data = apply_overrides({"strategy": "fedavg"}, ["client.lr=0.2", "strategy.server_lr=0.5", "rounds=4"])
    job = parse(JobConfig, data)
    assert job.client.lr == 0.2 and job.rounds == 4
    assert job.strategy == Named("fedavg", {"server_lr": 0.5})
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["client.lr"])


def test_round_trip_through_dict():
    job = load_job(None, ["strategy.name=fedprox", "strategy.mu=0.1"])
    assert parse(JobConfig, to_dict(job)) == job
