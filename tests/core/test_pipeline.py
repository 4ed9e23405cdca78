"""The aggregation pipeline: party-side and fold transforms around any strategy, in every runtime."""

import dataclasses
import math

import pytest
import torch

from fedfleet.config import load_job
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import Pipeline, TransformContext
from fedfleet.core.update import TrainStats, Update
from fedfleet.errors import ConfigError
from fedfleet.jobs.simulation import Simulation
from fedfleet.select import UniformSelector
from fedfleet.strategy import STRATEGIES, build_strategy
from fedfleet.transforms import ClipNorm, ClipNormBeforeFold, build_pipeline
from tests.core.test_loop import ScriptedRuntime

CTX = TransformContext(round=0, client_id=1, seed=0)


def delta(*values: float) -> FlatParams:
    return FlatParams.from_tensors({"w": torch.tensor(values)})


def test_clip_scales_a_delta_to_its_bound_and_leaves_a_small_one_alone():
    big = ClipNorm(max_norm=1.0)(Update(delta(3.0, 4.0), 1.0), CTX)  # norm 5
    assert big.params.tensors()["w"].tolist() == pytest.approx([0.6, 0.8])
    small = ClipNorm(max_norm=10.0)(Update(delta(3.0, 4.0), 1.0), CTX)
    assert small.params.tensors()["w"].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="max_norm"):
        ClipNorm(max_norm=0.0)
    with pytest.raises(ValueError, match="is_delta"):
        ClipNorm()(Update(delta(1.0), 1.0, is_delta=False), CTX)


class DropHeavy:
    """A fold transform that leaves out updates heavier than ``limit`` (a stand-in for a robust filter)."""

    mergeable = True

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def before_fold(self, update):
        return None if update.weight > self.limit else update

    def after_fold(self, aggregate):
        aggregate.extra["seen_by_after_fold"] = 1.0
        return aggregate


def test_a_shipped_partial_of_a_custom_fold_transform_still_merges():
    """Ray ships a worker's partial by pickling: its transforms come back as copies, not the same objects."""
    import pickle

    pipeline = Pipeline(server=(DropHeavy(limit=2.0),))
    top, share = (pipeline.aggregator(build_strategy("fedavg"), delta(0.0, 0.0)) for _ in range(2))
    share.add(Update(delta(1.0, 1.0), 1.0))
    top.merge(pickle.loads(pickle.dumps(share)))
    assert top.finish().count == 1


def test_fold_transforms_run_around_the_strategys_aggregator():
    pipeline = Pipeline(server=(DropHeavy(limit=2.0),))
    agg = pipeline.aggregator(build_strategy("fedavg"), delta(0.0, 0.0))
    for value, weight in [(1.0, 1.0), (3.0, 2.0), (100.0, 50.0)]:
        agg.add(Update(delta(value, value), weight))
    out = agg.finish()
    assert out.count == 2 and out.metrics["left_out"] == 1.0 and out.extra["seen_by_after_fold"] == 1.0
    assert out.params.tensors()["w"].tolist() == pytest.approx([7 / 3, 7 / 3])  # (1 * 1 + 3 * 2) / 3


def updates(n=5):
    gen = torch.Generator().manual_seed(0)
    return [
        Update(FlatParams.from_tensors({"w": torch.randn(6, generator=gen)}), float(i + 1),
               stats=TrainStats(initial_loss=1.0 + i))
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_partials_folded_through_the_pipeline_merge_to_one_fold(name):
    """What a Ray worker does with a mergeable chain: fold its share through the transforms, merge at the top."""
    pipeline = build_pipeline(server=[("clip", {"max_norm": 0.5})])
    strategy, like = build_strategy(name), FlatParams.from_tensors({"w": torch.zeros(6)})
    whole = pipeline.aggregator(strategy, like)
    for u in updates():
        whole.add(dataclasses.replace(u, params=u.params.clone()))
    top, left, right = (pipeline.aggregator(strategy, like) for _ in range(3))
    for i, u in enumerate(updates()):
        (left if i < 2 else right).add(u)
    top.merge(left)
    top.merge(right)
    a, b = whole.finish(), top.finish()
    assert a.count == b.count == 5
    assert a.params.allclose(b.params, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="other fold transforms"):
        top.merge(strategy.aggregator(like))


def test_a_job_files_transforms_reach_the_trainer_and_the_loop(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "rounds: 2\ncohort: 4\neval_every: 0\ndata: {clients: 8}\nmodel: {name: logistic_regression}\n"
        "transforms:\n  client: [{name: clip, max_norm: 0.05}]\n  server: [{name: clip, max_norm: 0.02}]\n"
    )
    sim = Simulation.from_config(load_job(job))
    assert sim.trainer.pipeline.client == (ClipNorm(0.05),)
    assert sim.loop.pipeline.server == (ClipNormBeforeFold(0.02),)
    start = sim.loop.global_params.clone()
    sim.run()
    moved = math.sqrt(sim.loop.global_params.sub(start).sq_norm())
    assert 0 < moved <= 2 * 0.02 + 1e-6  # two rounds, each mean of clipped deltas


def test_transform_typos_name_the_key(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("transforms:\n  client: [{name: clpi}]\n")
    with pytest.raises(ConfigError, match="clip"):
        Simulation.from_config(load_job(job))
    job.write_text("transforms:\n  server: [{name: clip, max_nrom: 1}]\n")
    with pytest.raises(ConfigError, match="max_norm"):
        Simulation.from_config(load_job(job))


def test_the_loop_folds_through_its_pipeline():
    runtime = ScriptedRuntime(4)  # client c sends [c, c] with weight c + 1
    loop = RoundLoop(
        build_strategy("fedavg"), runtime, UniformSelector(), delta(0.0, 0.0), FitConfig(),
        LoopConfig(rounds=1, cohort=4, eval_every=0), pipeline=Pipeline(server=(ClipNormBeforeFold(1.0),)),
    )  # fmt: skip
    loop.run()
    # deltas [c, c] clipped to norm 1 (client 0's is zero): c >= 1 becomes [1, 1] / sqrt(2)
    expected = (2 + 3 + 4) / 10 / math.sqrt(2)
    assert loop.global_params.tensors()["w"].tolist() == pytest.approx([expected, expected])


def test_every_runtime_applies_the_party_side_chain(tmp_path):
    """Sequential, vectorised and Ray-shipped trainers clip alike; without the chain the model moves more."""
    job = tmp_path / "job.yaml"
    text = "rounds: 1\ncohort: 4\neval_every: 0\ndata: {clients: 8}\nmodel: {name: logistic_regression}\n"
    clip = "transforms: {client: [{name: clip, max_norm: 0.01}]}\n"
    finals = {}
    for mode in ("off", "on"):
        job.write_text(text + clip + f"runtime: {{vectorize: '{mode}'}}\n")
        sim = Simulation.from_config(load_job(job))
        start = sim.loop.global_params.clone()
        sim.run()
        finals[mode] = sim.loop.global_params.sub(start)
    assert finals["off"].allclose(finals["on"], rtol=1e-4, atol=1e-6)
    assert math.sqrt(finals["off"].sq_norm()) <= 0.01 + 1e-6
    job.write_text(text)
    plain = Simulation.from_config(load_job(job))
    start = plain.loop.global_params.clone()
    plain.run()
    assert math.sqrt(plain.loop.global_params.sub(start).sq_norm()) > 0.05

    from fedfleet.runtime.ray.worker import TrainerFactory

    shipped = TrainerFactory.from_trainer(sim.trainer).build("cpu")
    assert shipped.pipeline == sim.trainer.pipeline  # Ray workers train with the same chain


def test_a_deployed_arbiter_folds_through_the_jobs_chain_and_each_party_applies_its_own(tmp_path):
    from fedfleet.config.loader import Named
    from fedfleet.config.schema import TransformsConfig
    from fedfleet.jobs.deploy import Access, build_arbiter, build_party
    from tests.grpc_jobs import write_job

    job = load_job(write_job(tmp_path))
    chain = TransformsConfig(client=(Named("clip", {"max_norm": 0.1}),), server=(Named("clip", {"max_norm": 0.2}),))
    job = dataclasses.replace(job, transforms=chain)
    access = Access(True, "certs", job.network.address)
    assert build_arbiter(job, access).loop.pipeline.server == (ClipNormBeforeFold(0.2),)
    assert build_party(job, "guest-9999", access).trainer.pipeline.client == (ClipNorm(0.1),)
