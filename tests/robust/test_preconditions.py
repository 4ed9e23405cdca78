"""Configurations outside a rule's precondition are refused when the job is read, with one message naming the
key; a round that kept fewer updates than the rule needs is incomplete, never aggregated some other way."""

import re

import pytest
import torch

from fedfleet.config import load_job
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.errors import ConfigError, RoundFailedError
from fedfleet.jobs.simulation import Simulation
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy
from fedfleet.transforms import JobFacts, build_pipeline
from tests.core.test_loop import ScriptedRuntime
from tests.robust.helpers import aggregate, honest

KRUM = "krum with f=3 needs at least 2f + 3 = 9 updates per round, but cohort is 8"
BULYAN = "bulyan with f=2 needs at least 4f + 3 = 11 updates per round, but cohort is 10"
TRIM = "trimmed_mean with beta={} trims floor(beta * n) = {} per end of n=10, fewer than {}"


@pytest.mark.parametrize(
    ("name", "params", "cohort", "message"),
    [
        ("krum", {"f": 3}, 8, KRUM),
        ("krum", {"f": 2, "m": 6}, 7, "krum averages m=6 updates, more than n - f = 5"),
        ("bulyan", {"f": 2}, 10, BULYAN),
        ("trimmed_mean", {"beta": 0.05}, 10, TRIM.format(0.05, 0, "1 (trimming none is the plain mean)")),
        ("trimmed_mean", {"beta": 0.1, "f": 2}, 10, TRIM.format(0.1, 1, "f=2")),
        ("median", {"f": 3}, 6, "median with f=3 needs at least max(3, 2f + 1) = 7 updates"),
        ("median", {}, 2, "median needs at least 3 updates per round"),
        ("geomedian", {}, 2, "geomedian needs at least 3 updates per round"),
    ],
)
def test_a_cohort_below_the_rules_precondition_is_a_config_error_naming_the_key(name, params, cohort, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"transforms.server '{name}': {message}")):
        build_pipeline(server=[(name, params)], job=JobFacts(cohort=cohort))
    build_pipeline(server=[(name, params)], job=JobFacts(cohort=100))  # a large enough cohort is fine


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("trimmed_mean", {"beta": 0.5}, "beta must be a number with 0 < beta < 0.5"),
        ("trimmed_mean", {"beta": 0}, "beta must be a number with 0 < beta < 0.5"),
        ("krum", {}, "missing 1 required keyword-only argument: 'f'"),
        ("krum", {"f": -1}, "f must be a whole number >= 0"),
        ("krum", {"f": 1, "m": 0}, "m must be a whole number >= 1"),
        ("bulyan", {"f": 1.5}, "f must be a whole number >= 0"),
        ("geomedian", {"nu": 0}, "nu must be a number > 0"),
        ("centered_clip", {"tau": -1}, "tau must be a number > 0"),
        ("median", {"spill_mb": -1}, "spill_mb must be a number >= 0"),
        ("norm_bound", {}, "norm_bound needs max_norm (a fixed bound) or multiplier (adaptive)"),
        ("krum", {"f": 1, "n": 3}, "unknown key 'n'"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(name, params, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_pipeline(server=[(name, params)])


def job_file(tmp_path, server: str, extra: str = "") -> str:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"rounds: 1\ncohort: 6\neval_every: 0\ndata: {{clients: 12}}\nmodel: {{name: logistic_regression}}\n"
        f"output: {{dir: {tmp_path}}}\ntransforms:\n  server: [{server}]\n{extra}"
    )
    return path


def test_a_job_file_is_refused_before_any_work_starts(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("'bulyan': bulyan with f=1 needs at least 4f + 3 = 7")):
        Simulation.from_config(load_job(job_file(tmp_path, "{name: bulyan, f: 1}")))
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*/metrics*"))
    fedbuff = "fedbuff: {buffer: 4, concurrency: 6}\n"
    with pytest.raises(
        ConfigError, match=re.escape("needs at least 2f + 3 = 5 updates per round, but fedbuff.buffer is 4")
    ):
        Simulation.from_config(load_job(job_file(tmp_path, "{name: krum, f: 1}", fedbuff)))


class DroppingRuntime(ScriptedRuntime):
    """Every client sends a delta of its own, but the first ``drop`` of each round never arrive."""

    def __init__(self, population: int, drop: int) -> None:
        super().__init__(population)
        self.drop = drop

    def fit(self, global_params, clients, config):
        yield from list(super().fit(global_params, clients, config))[self.drop :]


def loop_of(runtime, pipeline, cohort=5, strategy="fedavg"):
    return RoundLoop(
        build_strategy(strategy),
        runtime,
        UniformSelector(),
        FlatParams.from_tensors({"w": torch.zeros(2)}),
        FitConfig(),
        LoopConfig(rounds=1, cohort=cohort, seed=0, eval_every=0, max_attempts=2),
        pipeline=pipeline,
    )


def test_a_round_with_fewer_updates_than_the_rule_needs_fails_with_the_reason():
    """The cohort (5) meets Krum's 2f + 3 = 5, but two clients drop: the round is retried, then it fails."""
    pipeline = build_pipeline(server=[("krum", {"f": 1})], job=JobFacts(cohort=5))
    loop = loop_of(DroppingRuntime(10, drop=2), pipeline)
    with pytest.raises(
        RoundFailedError, match=re.escape("needs at least 2f + 3 = 5 updates per round, but this round kept 3")
    ):
        loop.run()
    assert loop.round == 0 and loop.global_params.tensors()["w"].tolist() == [0.0, 0.0]


class FailingOnceRuntime(ScriptedRuntime):
    """The first attempt of a round delivers two updates and then reports the round incomplete."""

    def __init__(self, population: int) -> None:
        super().__init__(population)
        self.attempts = 0

    def fit(self, global_params, clients, config):
        from fedfleet.core.loop import RoundIncomplete

        self.attempts += 1
        updates = list(super().fit(global_params, clients, config))
        if self.attempts == 1:
            for u in updates[:2]:
                u.params.mul_(1000.0)  # what the retry must not see again
                yield u
            raise RoundIncomplete("two of five")
        yield from updates


def test_a_retried_round_folds_only_its_own_updates():
    loop = loop_of(FailingOnceRuntime(10), build_pipeline(server=[("median", {})], job=JobFacts(cohort=5)))
    loop.run()
    clients = loop.runtime.calls[-1][0]
    assert loop.global_params.tensors()["w"].tolist() == [float(sorted(clients)[2])] * 2  # the median client


def test_a_strategy_without_a_weighted_mean_is_refused():
    with pytest.raises(ConfigError, match=r"'median' replaces the round's weighted mean.*QFedAvgAggregator"):
        aggregate("median", {}, honest(5), strategy="qfedavg")
