"""The cohort-vectorised runtime follows the sequential trajectory exactly (up to float rounding)."""

import pytest
import torch
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.data import federate, load_dataset, train_test_split
from fedfleet.models import build_model
from fedfleet.runtime.sim import NotVectorizable, SequentialRuntime, VectorizedRuntime, make_runtime
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy


@pytest.fixture(scope="module")
def digits():
    train, test = train_test_split(load_dataset("digits"), 0.2, seed=0)
    # Dirichlet: clients of very different sizes, so the vectorised path masks finished clients
    return federate(train, clients=30, scheme="dirichlet", seed=0, alpha=0.3), test


def run(runtime_cls, fed, test, strategy="fedavg", momentum=0.0, rounds=3, **fit):
    torch.manual_seed(0)
    trainer = TorchTrainer(build_model("simple_cnn", (1, 8, 8), 10, padding=1), momentum=momentum)
    loop = RoundLoop(
        build_strategy(strategy),
        runtime_cls(trainer, fed, test),
        UniformSelector(),
        trainer.params.clone(),
        FitConfig(**{"batch_size": 10, "lr": 0.05, **fit}),
        LoopConfig(rounds=rounds, cohort=6, seed=3, eval_every=rounds),
    )
    history = loop.run()
    return loop.global_params, history


@pytest.mark.parametrize(
    ("strategy", "momentum", "fit"),
    [("fedavg", 0.0, {"epochs": 2}), ("fedprox", 0.9, {"epochs": 1}), ("qfedavg", 0.0, {"steps": 4})],
)
def test_vectorised_equals_sequential(digits, strategy, momentum, fit):
    fed, test = digits
    seq, _ = run(SequentialRuntime, fed, test, strategy, momentum, rounds=1, **fit)
    vec, _ = run(VectorizedRuntime, fed, test, strategy, momentum, rounds=1, **fit)
    assert seq.allclose(vec, rtol=0, atol=1e-6)  # one round: equal up to summation order
    # later rounds: rounding differences flip a few ReLU/max-pool decisions and grow slowly, no more
    seq, seq_hist = run(SequentialRuntime, fed, test, strategy, momentum, rounds=3, **fit)
    vec, vec_hist = run(VectorizedRuntime, fed, test, strategy, momentum, rounds=3, **fit)
    assert seq.allclose(vec, rtol=0, atol=1e-3)
    for a, b in zip(seq_hist, vec_hist, strict=True):
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-4)
        assert a.metrics["train_loss_sq"] == pytest.approx(b.metrics["train_loss_sq"], rel=1e-4)
        assert a.metrics["train_loss_sq"] >= a.metrics["train_loss"] ** 2  # a mean square is at least the mean's
        assert a.metrics["train_samples"] == b.metrics["train_samples"]


def test_unvectorisable_models_fall_back_to_sequential(digits):
    fed, test = digits
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    trainer = TorchTrainer(bn)
    with pytest.raises(NotVectorizable, match="buffers"):
        VectorizedRuntime(trainer, fed, test)
    assert isinstance(make_runtime(trainer, fed, test, "auto"), SequentialRuntime)
    assert isinstance(make_runtime(TorchTrainer(bn, optimizer="adam"), fed, test, "auto"), SequentialRuntime)
    with pytest.raises(NotVectorizable):
        make_runtime(trainer, fed, test, "on")


def test_training_improves_accuracy(digits):
    fed, test = digits
    _, history = run(VectorizedRuntime, fed, test, rounds=20, epochs=2, lr=0.1)
    assert history[-1].metrics["test_accuracy"] > 0.6  # chance is 0.1
