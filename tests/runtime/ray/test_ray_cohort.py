"""Ray workers that each train their share of the cohort as one batched model give the single-process model."""

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")

from fedfleet.client import TorchTrainer  # noqa: E402
from fedfleet.core.fit_config import FitConfig  # noqa: E402
from fedfleet.core.loop import LoopConfig, RoundLoop  # noqa: E402
from fedfleet.data import federate, load_dataset  # noqa: E402
from fedfleet.runtime.ray import RayOptions, RayRuntime  # noqa: E402
from fedfleet.runtime.sim import SequentialRuntime  # noqa: E402
from fedfleet.select import UniformSelector  # noqa: E402
from fedfleet.strategy import build_strategy  # noqa: E402


def trainer():
    torch.manual_seed(0)
    return TorchTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), momentum=0.9)


def run(runtime, strategy):
    loop = RoundLoop(
        strategy,
        runtime,
        UniformSelector(),
        trainer().params.clone(),
        FitConfig(batch_size=8, lr=0.05, proximal_mu=0.1),
        LoopConfig(rounds=3, cohort=20, seed=3, eval_every=0),
    )
    loop.run()
    return loop.global_params


@pytest.mark.parametrize("vectorize", ["on", "auto"])
def test_each_worker_vectorises_its_share(monkeypatch, vectorize):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    fed = federate(load_dataset("digits"), clients=40, scheme="dirichlet", seed=0, alpha=0.5)  # ragged shares
    expected = run(SequentialRuntime(trainer(), fed), build_strategy("fedprox"))
    strategy = build_strategy("fedprox")
    options = RayOptions(workers=2, vectorize=vectorize)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        with RayRuntime(trainer(), fed, strategy=strategy, options=options) as runtime:
            got = run(runtime, strategy)
            kinds = ray.get([w.runtime_kind.remote() for w in runtime.workers])
    finally:
        ray.shutdown()
    assert kinds == (["VectorizedRuntime"] * 2 if vectorize == "on" else ["AutoRuntime"] * 2)
    assert got.allclose(expected, rtol=0, atol=1e-5)
