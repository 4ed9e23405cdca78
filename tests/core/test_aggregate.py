import torch

from fedfleet.core.aggregate import WeightedMean
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update


def vec(*values: float) -> FlatParams:
    return FlatParams.from_tensors({"w": torch.tensor(values)})


def test_weighted_mean_of_two_known_vectors():
    agg = WeightedMean(vec(0.0, 0.0))
    agg.add(Update(vec(1.0, 1.0), weight=1, metrics={"loss": 3.0}))
    agg.add(Update(vec(4.0, 4.0), weight=2, metrics={"loss": 0.0}))
    out = agg.finish()
    assert out.params.tensors()["w"].tolist() == [3.0, 3.0]
    assert out.weight == 3 and out.count == 2
    assert out.metrics == {"loss": 1.0}


def test_update_buffers_may_be_reused_after_add():
    agg = WeightedMean(vec(0.0))
    shared = vec(2.0)
    agg.add(Update(shared, weight=1))
    shared.buffers[torch.float32].fill_(4.0)  # the runtime reuses the buffer for the next client
    agg.add(Update(shared, weight=1))
    assert agg.finish().params.tensors()["w"].tolist() == [3.0]


def test_memory_is_independent_of_the_number_of_updates():
    like = FlatParams.from_tensors({"w": torch.zeros(1000)})
    agg = WeightedMean(like)
    update = Update(like.clone().zero_(), weight=1.0)
    before = len(agg.__dict__)
    for _ in range(500):
        agg.add(update)
    assert len(agg.__dict__) == before
    assert agg._sum.nbytes == like.nbytes  # one running sum, nothing kept per update


def test_updates_sharing_one_params_fold_once_as_if_each_were_added():
    shared = vec(1.5, -2.0, 0.25)
    updates = [Update(shared, weight=w, metrics={"loss": m}) for w, m in ((1.0, 2.0), (3.0, 4.0), (0.5, 1.0))]
    one_by_one, at_once = WeightedMean(vec(0.0, 0.0, 0.0)), WeightedMean(vec(0.0, 0.0, 0.0))
    for update in updates:
        one_by_one.add(update)
    at_once.add_same(shared, updates)
    a, b = one_by_one.finish(), at_once.finish()
    assert torch.allclose(a.params.tensors()["w"], b.params.tensors()["w"])
    assert (a.weight, a.count, a.metrics) == (b.weight, b.count, b.metrics)
    assert (b.weight, b.count) == (4.5, 3) and abs(b.metrics["loss"] - 14.5 / 4.5) < 1e-12
