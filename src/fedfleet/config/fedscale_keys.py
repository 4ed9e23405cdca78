"""Every key of a FedScale job file and what it becomes in fedfleet: tables, read by ``config.fedscale``.

FedScale's keys are the arguments of its ``config_parser.py`` (plus the DLRM keys its Taobao guide adds);
the defaults below are FedScale's, applied when a key is absent so that a translated job behaves as the
same file would under FedScale. A key is exactly one of:

    DIRECT         one fedfleet key                           learning_rate -> client.lr
    CHOICES        picks a registered fedfleet entry, whose   gradient_policy: fed-yogi -> strategy fedyogi,
                   parameters come from further keys          yogi_eta -> strategy.server_lr
    SYSTEM         the simulated devices (traces, round end)  device_conf_file, overcommitment
    DATA_KEYS      the dataset                                data_set
    DATA_FILTERS   bounds on a natural partition's clients    filter_less -> data.partition.min_samples
    ASYNC          the fedbuff section, when the job is       async_mode, max_concurrency -> fedbuff.concurrency
                   asynchronous
    IGNORED        known, but does not apply (with why)       ps_ip, use_cuda's cuda_device, num_loaders
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedfleet.errors import ConfigError

Convert = Callable[[str, Any], Any]  # (FedScale key, value from the YAML) -> fedfleet value


# -- values ----------------------------------------------------------------------------------------
# FedScale passes job_conf values to argparse as text ("--key value"), so files hold numbers, strings
# ("1e-3", "False") and space-separated lists ("122 64 16") alike; each converter takes all of them.
def _fail(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"job_conf {key}: expected {what}, got {value!r}")


def to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _fail(key, "a number", value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(key, "a number", value) from None
    if not math.isfinite(number):
        raise _fail(key, "a finite number", value)
    return number


def to_int(key: str, value: Any) -> int:
    number = to_float(key, value) if not isinstance(value, int) or isinstance(value, bool) else value
    if number != int(number):
        raise _fail(key, "a whole number", value)
    return int(number)


def to_ints(key: str, value: Any) -> list[int]:
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise _fail(key, "whole numbers, e.g. '64 16' or [64, 16]", value)
    return [to_int(key, v) for v in items]


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise _fail(key, "True or False", value)


def to_text(key: str, value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        raise _fail(key, "a string", value)
    return str(value)


def to_job_name(key: str, value: Any) -> str:
    """fedfleet's run folder is named after the job: characters a folder name cannot safely hold become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", to_text(key, value)).lstrip("._-")
    if not name:
        raise _fail(key, "a name made of letters, digits, '.', '_' or '-'", value)
    return name


def to_device(key: str, value: Any) -> str:
    return "auto" if to_bool(key, value) else "cpu"  # auto: a GPU when there is one


def blacklist_rounds(key: str, value: Any) -> int | None:
    rounds = to_int(key, value)
    return None if rounds == -1 else rounds  # FedScale: -1 turns the blacklist off


def fraction_minus_one(key: str, value: Any) -> float:
    """overcommitment 1.3 (select 1.3 K) is fedfleet's over-commitment factor 0.3 (select K x (1 + 0.3))."""
    ratio = to_float(key, value)
    if ratio < 1.0:
        raise ConfigError(f"job_conf {key}: must be >= 1.0 (1.3 selects 30% more clients than it keeps), got {value!r}")
    return round(ratio - 1.0, 12)  # 1.3 - 1 is 0.30000000000000004 in floating point


# -- keys that are one fedfleet key ----------------------------------------------------------------
@dataclass(frozen=True)
class Direct:
    target: str  # dotted fedfleet key
    convert: Convert
    default: Any = None  # FedScale's default, used when the key is absent; None: leave fedfleet's


DIRECT: dict[str, Direct] = {
    "job_name": Direct("name", to_job_name, "demo_job"),
    "rounds": Direct("rounds", to_int, 50),
    "num_participants": Direct("cohort", to_int, 4),
    "eval_interval": Direct("eval_every", to_int, 5),
    "sample_seed": Direct("seed", to_int, 233),
    "local_steps": Direct("client.steps", to_int, 20),
    "batch_size": Direct("client.batch_size", to_int, 30),
    "learning_rate": Direct("client.lr", to_float, 0.05),
    "weight_decay": Direct("client.weight_decay", to_float),
    "use_cuda": Direct("runtime.device", to_device),
}

# FedScale's client for every task but NLP: torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4). Filled in
# when the job's optimizer is SGD (the `fedfleet:` section may choose another; these then do not apply).
SGD_CLIENT: dict[str, Any] = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4}


# -- keys that choose a registered entry -----------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A FedScale key that is a parameter of the chosen entry."""

    target: str | None  # the fedfleet parameter; None: only ``Choice.derive`` reads it
    convert: Convert
    default: Any = None  # FedScale's default when absent (None: fedfleet's own)


@dataclass(frozen=True)
class Choice:
    name: str  # fedfleet registry name
    params: Mapping[str, Param] = field(default_factory=dict)
    # parameters computed from the job's converted values (e.g. q-FedAvg's L = 1 / learning_rate)
    derive: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    note: str = ""  # said in the report when this choice is made


def _qfedavg(values: Mapping[str, Any]) -> dict[str, Any]:
    # FedScale's q-FedAvg takes the client lr as 1 / L (the local Lipschitz estimate)
    return {"lipschitz": 1.0 / values["learning_rate"]}


def _oort(values: Mapping[str, Any]) -> dict[str, Any]:
    # FedScale's clients register their data size and device speed with Oort before round 1
    return {"profiles": True}


def _dlrm(values: Mapping[str, Any]) -> dict[str, Any]:
    """The guide's layer lists include the ends that fedfleet's DLRM fixes: the bottom MLP's last width is
    the embedding size (its output joins the dot products) and the top MLP's last width is the one click logit."""
    dim = values.get("sparse_feature_dim", 16)
    params: dict[str, Any] = {"embedding_dim": dim} if "sparse_feature_dim" in values else {}
    bottom = values.get("bot_layer_sizes")
    if bottom is not None:
        if bottom[-1] != dim:
            raise ConfigError(
                f"job_conf bot_layer_sizes {bottom} must end at sparse_feature_dim ({dim}): the bottom MLP's "
                f"output is one of the vectors DLRM takes dot products of"
            )
        params["bottom"] = bottom[:-1]
    top = values.get("top_layer_sizes")
    if top is not None:
        if top[-1] != 1:
            raise ConfigError(f"job_conf top_layer_sizes {top} must end at 1: the top MLP outputs one click logit")
        params["top"] = top[:-1]
    return params


_OORT: dict[str, Param] = {
    "exploration_factor": Param("exploration", to_float),
    "exploration_decay": Param("exploration_decay", to_float),
    "exploration_min": Param("exploration_min", to_float),
    "round_threshold": Param("preferred_percentile", to_float),
    "round_penalty": Param("penalty", to_float),
    "pacer_step": Param("pacer_step", to_int),
    "pacer_delta": Param("pacer_delta", to_float),
    "blacklist_rounds": Param("blacklist_rounds", blacklist_rounds),
    "blacklist_max_len": Param("blacklist_max_fraction", to_float),
    "clip_bound": Param("clip_quantile", to_float),
    # FedScale's Oort keeps clients whose utility is >= cut_off_util x the k-th best: the same rule
    "cut_off_util": Param("cutoff", to_float),
    "sample_window": Param("sample_window", to_float),  # explorers come from the sample_window x n best unexplored
}

_YOGI: dict[str, Param] = {
    "yogi_eta": Param("server_lr", to_float, 3e-3),
    "yogi_tau": Param("tau", to_float, 1e-8),
    "yogi_beta": Param("beta1", to_float, 0.9),
    "yogi_beta2": Param("beta2", to_float, 0.99),
}

_DLRM: dict[str, Param] = {
    "sparse_feature_dim": Param(None, to_int),
    "bot_layer_sizes": Param(None, to_ints),
    "top_layer_sizes": Param(None, to_ints),
}

_FEDAVG = Choice("fedavg")


@dataclass(frozen=True)
class ChoiceKey:
    target: str  # the fedfleet named section: selector, strategy, model
    table: Mapping[str, Choice]
    default: str | None  # FedScale's default choice (None: FedScale's default has no fedfleet counterpart)
    missing: str = ""  # why an absent key is an error (when there is no default)
    unavailable: str = ""  # said when the file names a choice fedfleet does not have


CHOICES: dict[str, ChoiceKey] = {
    "sample_mode": ChoiceKey(
        "selector", {"random": Choice("uniform"), "oort": Choice("oort", _OORT, derive=_oort)}, default="random"
    ),
    "gradient_policy": ChoiceKey(
        "strategy",
        {
            "fed-avg": _FEDAVG,
            "fedavg": _FEDAVG,
            "fed-prox": Choice("fedprox", {"proxy_mu": Param("mu", to_float, 0.1)}),
            "fed-yogi": Choice("fedyogi", _YOGI),
            "q-fedavg": Choice("qfedavg", {"qfed_q": Param("q", to_float, 1.0)}, derive=_qfedavg),
        },
        default="fed-avg",
    ),
    "model": ChoiceKey(
        "model",
        {
            "dlrm": Choice("dlrm", _DLRM, derive=_dlrm),
            "lr": Choice("logistic_regression"),
            "logistic_regression": Choice("logistic_regression"),
            "mlp": Choice("mlp"),
            "simple_cnn": Choice("simple_cnn", note="fedfleet's small CNN (two conv layers), not a FedScale model"),
        },
        default=None,
        missing="FedScale's default model, shufflenet_v2_x2_0, is not in fedfleet's zoo",
        unavailable="fedfleet builds models from its own zoo with random weights and downloads none; "
        "register your own with @MODELS.register and name it in the `fedfleet:` section",
    ),
}


# -- the dataset -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataChoice:
    data: dict[str, Any]  # fedfleet's data: section
    note: str = ""


_MOVIELENS = DataChoice(
    {"dataset": "movielens_ctr", "clients": None, "partition": "natural"},
    "MovieLens-100k as clicks (4-5 stars), one client per user: the shape of FedScale's DLRM/Taobao guide",
)

DATASETS: dict[str, DataChoice] = {
    "movielens": _MOVIELENS,
    "movielens_ctr": _MOVIELENS,
    "mnist": DataChoice(
        {"dataset": "mnist5k", "partition": "iid"},
        "fedfleet's mnist5k: 5,000 MNIST images shipped with fedfleet, split IID over data.clients (100)",
    ),
    "digits": DataChoice({"dataset": "digits", "partition": "iid"}, "scikit-learn's 8x8 digits, split IID"),
    "mnist5k": DataChoice({"dataset": "mnist5k", "partition": "iid"}),
    "synthetic": DataChoice({"dataset": "synthetic", "partition": "iid"}),
    # your own data: give its path in the `fedfleet:` section, e.g. {data: {dataset: {name: csv, path: f.csv}}}
    "csv": DataChoice({"dataset": "csv", "partition": "iid"}),
    "npz": DataChoice({"dataset": "npz", "partition": "iid"}),
}

# FedScale's datasets are downloads (benchmark/dataset/download.sh); fedfleet fetches nothing at run time
UNAVAILABLE_DATASETS = {
    "taobao": "the Taobao click logs of FedScale's DLRM guide are a Kaggle download; data_set: movielens is "
    "the same job (click prediction, users as clients) on data fedfleet reads offline, or bring your Taobao table "
    "as a CSV: `fedfleet: {data: {dataset: {name: csv, path: taobao.csv, label_column: clk, key_column: userid, "
    "sparse: [userid, adgroup_id, cate_id, brand], dense: [price]}, partition: natural, clients: null}}` "
    "(docs/coming-from-fedscale.md)",
}
DATASET_HINT = (
    "use one fedfleet provides offline: movielens (click prediction, one client per user: FedScale's DLRM "
    "guide), mnist, digits, synthetic; or your own file with data_set: csv or npz and `fedfleet: {data: "
    "{dataset: {name: csv, path: ...}}}`"
)


# FedScale leaves out of selection every client with fewer than filter_less or more than filter_more samples
# (client_manager.register_client). fedfleet's natural partition (one client per user key) does the same; other
# partitions size their clients themselves. FedScale's defaults (32, 1e15) are not applied when a key is absent:
# 32 was set for FedScale's datasets and would drop a third of fedfleet's MovieLens stand-in (298 of its 943 users
# hold fewer than 32 training ratings), so a job that leaves filter_less out keeps every client.
def _at_least_one(key: str, value: Any) -> int:
    return max(1, to_int(key, value))  # FedScale keeps size >= filter_less: 0 (or less) keeps every client, as 1 does


DATA_FILTERS: dict[str, Direct] = {
    "filter_less": Direct("data.partition.min_samples", _at_least_one),
    "filter_more": Direct("data.partition.max_samples", to_int),
}
NATURAL_ONLY = (
    "bounds a natural partition's clients (one per user key, sized by the data); this job's partition is {name}, "
    "whose clients fedfleet sizes itself: give your CSV a key column and `partition: natural` in the `fedfleet:` "
    "section"
)


# -- the simulated devices -------------------------------------------------------------------------
SYSTEM_KEYS = ("device_conf_file", "device_avail_file", "overcommitment")
OVERCOMMITMENT_DEFAULT = 1.3


# -- asynchronous FL: FedScale's FedBuff -> fedfleet's fedbuff section -------------------------------
# FedScale runs a job asynchronously when its top-level aggregator_entry is one of its async aggregators:
# fedscale/cloud/aggregation/async_aggregator.py (FedBuff: max_concurrency clients in flight, each from the
# model current at its start; every num_participants fresh arrivals, the staleness-weighted mean is the next
# model; arrivals more than max_staleness rounds old are dropped and do not count) or the older
# examples/async_fl/async_aggregator.py (the same, with async_buffer arrivals per step). config_parser.py also
# declares an async_mode flag. Either one makes the translation a fedbuff section.
ASYNC_MODE = "async_mode"
ASYNC_ENTRY = re.compile(r"(^|/)async_aggregator\.py$")  # aggregator_entry of FedScale's async aggregators
ASYNC: dict[str, Direct] = {
    "max_concurrency": Direct("fedbuff.concurrency", to_int, 100),
    "max_staleness": Direct("fedbuff.max_staleness", to_int, 5),
    "async_buffer": Direct("fedbuff.buffer", to_int),  # absent: num_participants, what FedScale's FedBuff collects
}
ASYNC_KEYS = (ASYNC_MODE, *ASYNC)
# FedScale's FedBuff scales each arrival by 1 / sqrt(1 + staleness) and counts every client alike
ASYNC_FIXED: dict[str, Any] = {"staleness": {"name": "polynomial", "exponent": 0.5}, "weight_by_examples": False}
ASYNC_DIFFERS = (
    "FedScale divides the buffer's staleness-scaled sum by the sum of the staleness factors (a buffer of stale "
    "updates moves the model as far as a fresh one); fedfleet divides by the buffer size, as the FedBuff paper "
    "does, so stale buffers move it less. FedScale's FedBuff aggregator also averages the clients' models (each "
    "trained from its own, older start) where fedfleet adds the averaged deltas to the current model"
)
ASYNC_ONLY = (
    "applies to asynchronous jobs only (async_mode: true, or an async_aggregator.py aggregator_entry); this job "
    "runs synchronous rounds"
)
SYNC_ONLY_OVERCOMMIT = (
    "an asynchronous job asks one client for each freed training slot, as FedScale's FedBuff aggregator does: "
    "over-commitment applies to synchronous rounds only"
)

# -- known keys that do not apply, and why ---------------------------------------------------------
_CLUSTER = (
    "fedfleet simulate runs the whole job in one process (runtime.kind: ray scales it out): "
    "no parameter server or executors to start"
)
_LOADERS = "client data lives in memory as tensors; there are no loader workers or data folders"
_CLIENT_MAP = (
    "fedfleet does not read FedScale's sample-to-client map (client_id,sample_path,label_name,label_id rows); "
    "bring your own client split as a column of your table: `fedfleet: {data: {dataset: {name: csv, path: ..., "
    "key_column: client_id}, partition: natural, clients: null}}` makes one client per distinct key"
)
_FROM_DATA = "fedfleet reads it from the dataset (input shape, classes, DLRM's dense/sparse columns and table sizes)"
_OTHER_TASKS = "a setting of FedScale's NLP / detection / speech / RL tasks, which fedfleet's simulate does not have"
_LOGGING = "fedfleet writes metrics.csv, metrics.jsonl and TensorBoard events (tb/) into <output.dir>/<name>/"
_DP = "differential privacy is not part of fedfleet simulate yet: updates are folded without noise"
_CONSTANT_LR = "fedfleet keeps the client learning rate constant (FedScale decays it every decay_round rounds)"

_CLUSTER_KEYS = ("ps_ip", "ps_port", "worker_ips", "exp_path", "executor_entry", "aggregator_entry", "auth",
                 "setup_commands", "this_rank", "connection_timeout", "num_executors", "executor_configs", "backend",
                 "experiment_mode", "engine")  # fmt: skip
_FROM_DATA_KEYS = ("input_shape", "input_dim", "output_dim", "num_classes", "dense_feature_dim",
                   "sparse_feature_number", "num_field")  # fmt: skip
_OTHER_TASK_KEYS = ("embedding_file", "cfg_file", "test_output_dir", "train_size_file", "test_size_file", "backbone",
                    "line_by_line", "clf_block_size", "mlm", "mlm_probability", "overwrite_cache", "block_size",
                    "adam_epsilon", "vocab_token_size", "vocab_tag_size", "epsilon", "gamma", "memory_capacity",
                    "target_replace_iter", "n_actions", "n_states", "train-manifest", "test-manifest", "sample-rate",
                    "labels-path", "window-size", "window-stride", "window", "hidden-size", "hidden-layers",
                    "rnn-type", "finetune", "speed-volume-perturb", "spec-augment", "noise-dir", "noise-prob",
                    "noise-min", "noise-max", "no-bidirectional")  # fmt: skip

IGNORED: dict[str, str] = {
    **dict.fromkeys(_CLUSTER_KEYS, _CLUSTER),
    "cuda_device": "fedfleet picks the device with runtime.device (e.g. --set runtime.device=cuda:1)",
    **dict.fromkeys(("num_loaders", "data_dir", "data_cache", "conf_path"), _LOADERS),
    "data_map_file": _CLIENT_MAP,
    "test_bsz": "central evaluation batches are sized by fedfleet",
    "test_ratio": "fedfleet evaluates on the whole held-out set (data.test_fraction sets its size)",
    "task": "fedfleet knows the task from the dataset and model (e.g. movielens_ctr + dlrm: clicks with a BCE loss)",
    "model_zoo": "fedfleet builds models from its own registry (fedfleet list models)",
    **dict.fromkeys(_FROM_DATA_KEYS, _FROM_DATA),
    "sync_mode": "fedfleet's DLRM sends the shared tables each round; keep rows on clients with client.keep_local",
    **dict.fromkeys(("log_path", "time_stamp", "wandb_token", "dump_epoch"), _LOGGING),
    "save_checkpoint": "fedfleet always checkpoints (every output.checkpoint_every rounds and after the last)",
    **dict.fromkeys(("decay_factor", "decay_round", "min_learning_rate"), _CONSTANT_LR),
    "train_uniform": "fedfleet's partition is set by the dataset (data.partition)",
    "model_size": "fedfleet measures the bytes exchanged from the model's params",
    "clock_factor": "scale FedScale trace compute with `fedfleet: {system: {traces: {augmentation_factor: ...}}}`",
    "loss_decay": "fedfleet's clients report their mean training loss (and its square) for Oort, not a moving one",
    "exploration_alpha": "unused by FedScale's Oort as well (its staleness term is fixed)",
    "malicious_factor": "fedfleet validates every update instead (names, shapes, finite values, weight bounds)",
    "upload_step": "fedfleet's clients send one update per round",
    "arrival_interval": "FedScale's example async aggregator (examples/async_fl) starts a client every "
    "arrival_interval seconds; fedfleet's FedBuff, like FedScale's FedBuff aggregator, starts one whenever a "
    "training slot frees, among the clients the traces have online",
    "checkin_period": "declared in FedScale's config_parser.py ('number of rounds to sample async clients') but "
    "read by neither of its async aggregators; fedfleet refills a freed training slot at once",
    **dict.fromkeys(("noise_factor", "clip_threshold", "target_delta"), _DP),
    **dict.fromkeys(_OTHER_TASK_KEYS, _OTHER_TASKS),
}

# top-level keys of conf.yml (FedScale's driver reads these; job_conf holds the job)
TOP_LEVEL_IGNORED = ("ps_ip", "ps_port", "worker_ips", "exp_path", "executor_entry", "aggregator_entry", "auth",
                     "setup_commands")  # fmt: skip
EXTENSION = "fedfleet"  # a top-level section for fedfleet-only settings; FedScale's driver never reads it


def group_of() -> dict[str, tuple[str, list[str]]]:
    """FedScale key -> (its choice key, the choices that read it): yogi_eta -> (gradient_policy, [fed-yogi])."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for choice_key, spec in CHOICES.items():
        for value, choice in spec.table.items():
            for key in choice.params:
                groups.setdefault(key, (choice_key, []))[1].append(value)
    return groups


def known_keys() -> list[str]:
    return sorted({*DIRECT, *CHOICES, *group_of(), "data_set", *DATA_FILTERS, *SYSTEM_KEYS, *ASYNC_KEYS, *IGNORED})


def fedfleet_override(key: str, value: str) -> str | None:
    """The ``--set`` that means FedScale's ``key=value`` (``sample_mode=oort`` -> ``selector.name=oort``), or None
    when ``key`` is not a FedScale job key with another fedfleet name."""
    if key in DIRECT and DIRECT[key].target != key:
        return f"{DIRECT[key].target}={value}"
    if key in CHOICES:
        choice = CHOICES[key].table.get(value)
        return f"{CHOICES[key].target}.name={choice.name if choice else value}"
    return None
