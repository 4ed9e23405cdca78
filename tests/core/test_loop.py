"""The round loop with a scripted runtime: what it selects, folds, steps, evaluates and reports."""

import numpy as np
import pytest
import torch

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy


class ScriptedRuntime:
    """Client c always sends the delta [c, c] with weight c + 1; evaluation reports the global's sum."""

    def __init__(self, population: int) -> None:
        self.population = population
        self.calls: list[tuple[list[int], FitConfig]] = []

    def fit(self, global_params, clients, config):
        self.calls.append(([int(c) for c in clients], config))
        for c in clients:
            delta = FlatParams.from_tensors({"w": torch.full((2,), float(c))})
            yield Update(delta, weight=c + 1.0, metrics={"loss": float(c)}, client_id=int(c))

    def round_metrics(self):
        return {}

    def evaluate(self, global_params):
        return {"sum": float(global_params.buffers[torch.float32].sum())}


def make_loop(rounds=3, cohort=2, population=5, eval_every=1, callbacks=(), strategy="fedavg", seed=0):
    runtime = ScriptedRuntime(population)
    params = FlatParams.from_tensors({"w": torch.zeros(2)})
    loop = RoundLoop(
        build_strategy(strategy),
        runtime,
        UniformSelector(),
        params,
        FitConfig(lr=0.5),
        LoopConfig(rounds=rounds, cohort=cohort, seed=seed, eval_every=eval_every),
        callbacks,
    )
    return loop, runtime


def test_each_round_folds_the_weighted_mean_of_the_selected_clients():
    loop, runtime = make_loop(rounds=3)
    history = loop.run()
    expected = 0.0
    for clients, config in runtime.calls:
        weights = np.array(clients) + 1.0
        expected += float((np.array(clients) * weights).sum() / weights.sum())
        assert config.lr == 0.5 and config.seed == 0
    assert [c.round for _, c in runtime.calls] == [0, 1, 2]
    assert loop.global_params.tensors()["w"].tolist() == pytest.approx([expected, expected])
    assert [r.round for r in history] == [0, 1, 2]
    assert history[-1].metrics["test_sum"] == pytest.approx(2 * expected)
    assert history[0].metrics["clients"] == 2
    assert history[-1].metrics["sim_time_s"] > history[0].metrics["sim_time_s"] > 0


def test_selection_is_seeded_and_differs_between_rounds():
    a, ra = make_loop(rounds=4, seed=3)
    b, rb = make_loop(rounds=4, seed=3)
    a.run()
    b.run()
    assert [c for c, _ in ra.calls] == [c for c, _ in rb.calls]
    assert len({tuple(c) for c, _ in ra.calls}) > 1


def test_eval_every_k_rounds_and_after_the_last():
    loop, _ = make_loop(rounds=5, eval_every=2)
    history = loop.run()
    assert ["test_sum" in r.metrics for r in history] == [False, True, False, True, True]


def test_callbacks_see_every_round_and_can_stop_the_run():
    seen = []

    class StopAfterTwo(Callback):
        def on_round_end(self, loop, record):
            seen.append(record.round)
            if loop.round == 2:
                loop.request_stop()

        def on_run_end(self, loop, status):
            seen.append(status)

    loop, _ = make_loop(rounds=5, callbacks=[StopAfterTwo()])
    loop.run()
    assert seen == [0, 1, "stopped"]


def test_snapshot_restore_resumes_to_the_same_model():
    full, _ = make_loop(rounds=4, strategy="fedavg")
    full.run()
    first, _ = make_loop(rounds=2)
    first.run()
    snap = first.snapshot()
    resumed, _ = make_loop(rounds=4)
    resumed.restore({**snap, "global": snap["global"].clone()})
    resumed.run()
    assert resumed.round == 4
    assert resumed.global_params.allclose(full.global_params, rtol=0, atol=0)
    assert [r.round for r in resumed.history] == [0, 1, 2, 3]


def test_cohort_larger_than_population_is_refused():
    with pytest.raises(ValueError, match="larger than the population"):
        make_loop(cohort=6, population=5)
