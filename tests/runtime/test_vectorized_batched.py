"""The cohort trained as one batched model equals the clients trained one by one.

In float64 the two differ only by summation order (~1e-16), so every optimizer, ragged cohorts and FedProx are
checked to 1e-9: the same seeds, the same batches, the same update rule. In float32 whole runs are checked too.
"""

import logging

import pytest
import torch
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.data import federate, load_dataset
from fedfleet.runtime.sim import AutoRuntime, SequentialRuntime, VectorizedRuntime, make_runtime
from fedfleet.runtime.sim.cohort_layers import unbatchable
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy


@pytest.fixture(scope="module")
def ragged():
    """Digits over 12 clients of very different sizes (Dirichlet): 1 to 30+ batches of 8, short last batches."""
    return federate(load_dataset("digits"), clients=12, scheme="dirichlet", seed=1, alpha=0.3)


def as_double(fed):
    from fedfleet.data.federated import FederatedDataset

    return FederatedDataset(fed.x.double(), fed.y, fed.offsets, fed.num_classes)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def every_kernel():
    """Conv, group norm, layer norm, linear without bias, a frozen layer and parameter-free layers in between."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 16, bias=False),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Linear(16, 16),
        nn.Linear(16, 10),
    )
    model[8].requires_grad_(False)  # exchanged but frozen
    return model


class Embedded(nn.Module):
    """Pixel intensities as ids into an embedding table, then a linear head: a custom forward."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(17, 4, padding_idx=0)
        self.head = nn.Linear(64 * 4, 10)

    def forward(self, x):
        ids = (x.flatten(1) * 16).round().long()
        return self.head(self.table(ids).flatten(1))


def deltas(runtime, start, clients, config):
    return [(u.params.clone(), u.stats, u.metrics, u.weight) for u in runtime.fit(start, clients, config)]


def compare(model_fn, fed, trainer_kw, fit_kw, atol, chunk=None):
    torch.manual_seed(0)
    model = model_fn().double()
    trainer = TorchTrainer(model, **trainer_kw)
    vec = VectorizedRuntime(trainer, fed)
    vec.chunk = chunk
    assert vec.engine_name == "layers"
    start = trainer.params.clone()
    config = FitConfig(round=2, seed=7, batch_size=8, **fit_kw)
    clients = [0, 3, 5, 6, 8, 11]
    got = deltas(vec, start, clients, config)
    want = deltas(SequentialRuntime(trainer, fed), start, clients, config)
    sizes = {int(fed.offsets[c + 1] - fed.offsets[c]) for c in clients}
    assert len(sizes) > 3  # ragged: the test means something
    for (dv, sv, mv, wv), (ds, ss, ms, ws) in zip(got, want, strict=True):
        assert dv.allclose(ds, rtol=0, atol=atol), float(dv.sub(ds).max_abs())
        assert dv.max_abs() > 100 * atol  # the clients did move
        assert mv == ms and wv == ws and sv.samples == ss.samples
        # the sequential trainer sums its loss statistics in float32
        assert sv.loss == pytest.approx(ss.loss, rel=1e-6)
        assert sv.loss_sq == pytest.approx(ss.loss_sq, rel=1e-6)


OPTIMIZERS = [
    ({"optimizer": "sgd"}, {"lr": 0.1}),
    ({"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-3}, {"lr": 0.05, "epochs": 2}),
    ({"optimizer": "adam", "weight_decay": 1e-3}, {"lr": 0.01}),
    ({"optimizer": "adamw", "weight_decay": 1e-2}, {"lr": 0.01}),
    ({"optimizer": "adagrad"}, {"lr": 0.05, "steps": 7}),
    ({"optimizer": "rmsprop", "momentum": 0.5}, {"lr": 0.001}),
    ({"optimizer": "rmsprop"}, {"lr": 0.001}),
]


@pytest.mark.parametrize(("trainer_kw", "fit_kw"), OPTIMIZERS)
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_every_optimizer_on_a_ragged_cohort_equals_sequential(ragged, trainer_kw, fit_kw, mu):
    compare(mlp, as_double(ragged), trainer_kw, {**fit_kw, "proximal_mu": mu}, atol=1e-9)


@pytest.mark.parametrize(("trainer_kw", "fit_kw"), [OPTIMIZERS[0], OPTIMIZERS[2]])
def test_a_cohort_trained_in_chunks_equals_sequential(ragged, trainer_kw, fit_kw):
    """Chunks of 4 of the 6 clients (the cohort past CHUNK_BYTES): each chunk takes all its steps, then the next."""
    compare(mlp, as_double(ragged), trainer_kw, {**fit_kw, "proximal_mu": 0.1}, atol=1e-9, chunk=4)


@pytest.mark.parametrize("model_fn", [every_kernel, Embedded])
@pytest.mark.parametrize(("trainer_kw", "fit_kw"), [OPTIMIZERS[1], OPTIMIZERS[2]])
def test_every_layer_kernel_equals_sequential(ragged, model_fn, trainer_kw, fit_kw):
    compare(model_fn, as_double(ragged), trainer_kw, {**fit_kw, "proximal_mu": 0.1}, atol=1e-9)


def run(runtime_cls, fed, strategy, rounds, **trainer_kw):
    torch.manual_seed(0)
    trainer = TorchTrainer(mlp(), **trainer_kw)
    loop = RoundLoop(
        build_strategy(strategy),
        runtime_cls(trainer, fed),
        UniformSelector(),
        trainer.params.clone(),
        FitConfig(batch_size=8, lr=0.05),
        LoopConfig(rounds=rounds, cohort=8, seed=3, eval_every=0),
    )
    history = loop.run()
    return loop.global_params, history


@pytest.mark.parametrize(("strategy", "trainer_kw"), [("fedavg", {}), ("fedprox", {"momentum": 0.9})])
def test_the_final_model_equals_sequential_in_float32(ragged, strategy, trainer_kw):
    seq, seq_hist = run(SequentialRuntime, ragged, strategy, 5, **trainer_kw)
    vec, vec_hist = run(VectorizedRuntime, ragged, strategy, 5, **trainer_kw)
    assert seq.allclose(vec, rtol=0, atol=1e-5)
    for a, b in zip(seq_hist, vec_hist, strict=True):
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-5)


class Centred(nn.Module):
    """A forward that mixes a batch's samples (subtracts the batch mean): no cohort batch can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.lin(x - x.mean(0))


class Scaled(nn.Module):
    """Holds a parameter directly (no cohort kernel): trained through vmap instead."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x):
        return self.lin(x.flatten(1)) * self.scale


def test_a_model_the_layers_cannot_batch_trains_through_vmap_and_says_why(ragged, caplog):
    torch.manual_seed(0)
    trainer = TorchTrainer(Scaled())
    with caplog.at_level(logging.INFO, logger="fedfleet.runtime.sim.vectorized"):
        runtime = VectorizedRuntime(trainer, ragged)
    assert runtime.engine_name == "vmap"
    assert "no cohort kernel" in caplog.text
    start = trainer.params.clone()
    config = FitConfig(batch_size=8, lr=0.05)
    got = deltas(runtime, start, [1, 2], config)
    want = deltas(SequentialRuntime(trainer, ragged), start, [1, 2], config)
    for (dv, *_), (ds, *_) in zip(got, want, strict=True):
        assert dv.allclose(ds, rtol=0, atol=1e-6)


def test_unbatchable_models_fall_back_to_sequential_with_one_line(ragged, caplog):
    dropout = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10))
    batch_norm = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, affine=False, track_running_stats=False))
    assert "random generator" in unbatchable(dropout)
    assert "normalises over the batch" in unbatchable(batch_norm)
    for model, why in [(dropout, "vmap cannot batch"), (Centred(), "mixes the samples")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedfleet.runtime.sim"):
            runtime = make_runtime(TorchTrainer(model), ragged, None, "auto")
        assert isinstance(runtime, SequentialRuntime)
        (line,) = [r.getMessage() for r in caplog.records if "one by one" in r.getMessage()]
        assert why in line


def test_auto_on_a_cpu_picks_the_cohort_path_by_the_rule(ragged, caplog):
    runtime = make_runtime(TorchTrainer(mlp()), ragged, None, "auto")
    assert isinstance(runtime, AutoRuntime)
    start = runtime.sequential.trainer.params.clone()
    config = FitConfig(batch_size=8, lr=0.05)
    with caplog.at_level(logging.INFO, logger="fedfleet.runtime.sim.choice"):
        big = [u.params.clone() for u in runtime.fit(start, list(range(10)), config)]
        small = [u.params.clone() for u in runtime.fit(start, [0, 1], config)]
    assert "training the cohort at once: 10 clients" in caplog.text
    assert "training clients one by one: 2 clients are fewer than" in caplog.text
    assert big[0].allclose(small[0], rtol=0, atol=1e-6)  # either way, the same training
    conv = make_runtime(TorchTrainer(every_kernel()), ragged, None, "auto")
    with caplog.at_level(logging.INFO, logger="fedfleet.runtime.sim.choice"):
        list(conv.fit(conv.sequential.trainer.params.clone(), list(range(10)), config))
    assert "convolutions are compute-bound" in caplog.text


class TiedAndIdle(nn.Module):
    """One layer applied twice (tied weights) and one the forward never calls (its gradient is zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.tied = nn.Linear(16, 16)
        self.idle = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.out(torch.tanh(self.tied(torch.tanh(self.tied(h)))))


@pytest.mark.parametrize(("trainer_kw", "fit_kw"), [OPTIMIZERS[0], OPTIMIZERS[2]])
def test_tied_and_unused_layers_equal_sequential(ragged, trainer_kw, fit_kw):
    """Plain SGD is fused into the backward pass: a layer called twice must still see its weight unchanged in
    the other call's backward, and an unused layer takes the step a zero gradient gives (weight decay: Adam)."""
    compare(TiedAndIdle, as_double(ragged), trainer_kw, fit_kw, atol=1e-9)
