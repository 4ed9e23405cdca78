import dataclasses

import pytest

from fedfleet.config import JobConfig, Named, load_job, to_dict
from fedfleet.config.loader import Identifier, apply_overrides, load, parse
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


def test_every_problem_of_a_job_file_is_reported_at_once(tmp_path):
    """Three mistakes in three places: one run names all three (they used to take three runs)."""
    text = "roundz: 3\nclient: {lrr: 0.1, epochs: two}\noutput: {tensorboard: 1}\n"
    with pytest.raises(ConfigError) as caught:
        load_job(write(tmp_path, text))
    message = str(caught.value)
    for problem in ("roundz: unknown key", "client.lrr: unknown key", "client.epochs: expected a whole number",
                    "output.tensorboard: expected true or false"):  # fmt: skip
        assert problem in message
    assert message.count("\n") == 3  # one line each


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


@dataclasses.dataclass(frozen=True)
class _Inner:
    k: int = 1

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError("k must be >= 0")  # a dataclass from elsewhere may raise ConfigError, not ValueError


@dataclasses.dataclass(frozen=True)
class _Outer:
    pairs: tuple[tuple[str, Identifier], ...] = ()
    who: Identifier = "a"
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_fixed_length_tuples_identifiers_and_foreign_post_init():
    got = parse(_Outer, {"pairs": [["guest", 9999], ["host", "x"]], "who": 7})
    assert got == _Outer((("guest", "9999"), ("host", "x")), "7")
    with pytest.raises(ConfigError, match=r"^pairs\[1\]: expected a list of 2 values"):
        parse(_Outer, {"pairs": [["guest", 1], ["host"]]})
    with pytest.raises(ConfigError, match=r"^pairs\[0\]\[0\]: expected a string, got 3"):
        parse(_Outer, {"pairs": [[3, 1]]})
    with pytest.raises(ConfigError, match=r"^who: expected a string, got True"):
        parse(_Outer, {"who": True})
    with pytest.raises(ConfigError, match=r"^inner: k must be >= 0$"):
        parse(_Outer, {"inner": {"k": -1}})


def test_load_names_the_file_in_every_error(tmp_path):
    path = write(tmp_path, "inner: {kk: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: inner\.kk: unknown key \(did you mean 'k'\?\)"):
        load(_Outer, path)
    path = write(tmp_path, "whoo: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: whoo: unknown key \(did you mean 'who'\?\)"):
        load(_Outer, path)
    path = write(tmp_path, "- 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: the job must be a mapping"):
        load(_Outer, path)
    assert load(_Outer, write(tmp_path, "who: b\n")) == _Outer(who="b")


def test_the_python_api_and_a_job_file_share_one_set_of_defaults():
    """Simulation.build, a job file, a party-paced arbiter and a party's context: the same defaults."""
    import dataclasses
    import inspect

    from fedfleet.core.fit_config import FitConfig
    from fedfleet.jobs.assemble import fit_config
    from fedfleet.jobs.simulation import Simulation
    from fedfleet.runtime.grpc.settings import ROUND_TIMEOUT, SessionSettings
    from fedfleet.runtime.grpc.wire import JoinMode
    from fedfleet.sync import create_context
    from fedfleet.sync.arbiter import SyncSessionConfig

    job = JobConfig()
    assert fit_config(job) == dataclasses.replace(FitConfig(), round=0)
    build = inspect.signature(Simulation.build).parameters
    for key in ("rounds", "cohort", "seed", "eval_every"):
        assert build[key].default == getattr(job, key), key
    shared = [f.name for f in dataclasses.fields(SessionSettings)]
    settings, sync = SessionSettings(), SyncSessionConfig(parties=("guest-1",))
    for key in shared:
        assert getattr(job.network, key) == getattr(settings, key) == getattr(sync, key), key
    ctx = create_context(("guest", 1), [("guest", 1), ("arbiter", 2)], "s")
    assert (ctx.arbiter_address, ctx.certs, ctx.heartbeat_s, ctx.reconnect_max_s) == (
        settings.address,
        settings.certs,
        settings.heartbeat_s,
        settings.reconnect_max_s,
    )
    # the one default that depends on pacing, from one table
    assert job.network.round_timeout_s(JoinMode.TASKS) == ROUND_TIMEOUT[JoinMode.TASKS] == 600
    assert sync.round_timeout_s(JoinMode.SYNC) == ROUND_TIMEOUT[JoinMode.SYNC] == 24 * 3600


@pytest.mark.parametrize(
    ("override", "fedfleet"),
    [
        ("sample_mode=oort", "selector.name=oort"),
        ("gradient_policy=fed-prox", "strategy.name=fedprox"),
        ("learning_rate=0.1", "client.lr=0.1"),
    ],
)
def test_a_fedscale_key_given_to_set_names_the_fedfleet_key(override, fedfleet):
    with pytest.raises(ConfigError, match=f"FedScale key, and --set takes fedfleet keys: --set {fedfleet}"):
        load_job(None, [override])
    assert load_job(None, ["rounds=3"]).rounds == 3  # a key both use is simply the fedfleet one
