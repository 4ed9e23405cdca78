"""TorchTrainer against a plain PyTorch loop doing the same steps."""

import dataclasses

import pytest
import torch
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.client.torch_trainer import batch_indices
from fedfleet.core.fit_config import FitConfig
from fedfleet.data.federated import ClientData
from fedfleet.errors import TrainingDivergedError


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def data(n: int = 23) -> ClientData:
    gen = torch.Generator().manual_seed(1)
    return ClientData(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def reference(config: FitConfig, d: ClientData, momentum=0.0, wd=0.0, mu=0.0, opt="sgd") -> nn.Module:
    """What a person writes by hand: torch.optim over the same batches, prox term in the loss."""
    m = model()
    start = [p.detach().clone() for p in m.parameters()]
    kwargs = {"momentum": momentum} if opt == "sgd" else {}
    optim = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[opt](
        m.parameters(), lr=config.lr, weight_decay=wd, **kwargs
    )
    gen = torch.Generator().manual_seed(config.seed)
    for idx in batch_indices(len(d.y), config, gen, torch.device("cpu")):
        optim.zero_grad()
        loss = nn.functional.cross_entropy(m(d.x[idx]), d.y[idx])
        loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(m.parameters(), start, strict=True))
        loss.backward()
        optim.step()
    return m


@pytest.mark.parametrize(
    ("momentum", "wd", "mu", "opt"),
    [(0.0, 0.0, 0.0, "sgd"), (0.9, 1e-3, 0.0, "sgd"), (0.0, 0.0, 0.5, "sgd"), (0.0, 0.0, 0.1, "adam")],
)
def test_fit_matches_a_plain_pytorch_loop(momentum, wd, mu, opt):
    config = FitConfig(epochs=2, batch_size=5, lr=0.1, seed=7, proximal_mu=mu)
    d = data()
    trainer = TorchTrainer(model(), optimizer=opt, momentum=momentum, weight_decay=wd)
    start = trainer.params.clone()
    update = trainer.fit(start, config, d)
    ref = reference(config, d, momentum, wd, mu, opt)
    expected = {n: p.detach() - start.tensors()[n] for n, p in ref.named_parameters()}
    for name, delta in update.params.tensors().items():
        assert torch.allclose(delta, expected[name], atol=1e-6), name
    assert update.weight == 23
    assert update.metrics["steps"] == 10 and update.stats.samples == 46


def test_steps_mode_runs_exactly_that_many_steps():
    trainer = TorchTrainer(model())
    update = trainer.fit(trainer.params.clone(), FitConfig(steps=7, batch_size=10), data(23))
    assert update.metrics["steps"] == 7 and update.stats.samples == 10 + 10 + 3 + 10 + 10 + 3 + 10


def test_initial_loss_is_the_loss_at_the_global_model():
    trainer = TorchTrainer(model())
    d = data()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model()(d.x), d.y))
    update = trainer.fit(trainer.params.clone(), FitConfig(report_initial_loss=True), d)
    assert update.stats.initial_loss == pytest.approx(expected, rel=1e-6)


def test_mean_square_loss_for_oort_is_taken_over_samples():
    trainer = TorchTrainer(model())
    d = data()
    with torch.no_grad():  # one batch of all 23 samples: the losses are those of the starting model
        per_sample = nn.functional.cross_entropy(model()(d.x), d.y, reduction="none")
    update = trainer.fit(trainer.params.clone(), FitConfig(batch_size=23), d)
    assert update.stats.loss_sq == pytest.approx(float(per_sample.square().mean()), rel=1e-6)
    assert update.stats.loss == pytest.approx(float(per_sample.mean()), rel=1e-6)
    plain = TorchTrainer(model(), loss=lambda out, y: nn.functional.cross_entropy(out, y))
    assert plain.fit(plain.params.clone(), FitConfig(), d).stats.loss_sq is None  # no per-sample twin


def test_evaluate_reports_loss_and_accuracy():
    trainer = TorchTrainer(model(), eval_batch_size=4)
    d = data(10)
    out = model()(d.x).detach()
    metrics = trainer.evaluate(trainer.params.clone(), d)
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, d.y)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((out.argmax(1) == d.y).float().mean()))


def test_nan_loss_is_a_clear_error():
    d = data()
    bad = ClientData(d.x.clone(), d.y)
    bad.x[3, 1] = float("nan")
    trainer = TorchTrainer(model())
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        trainer.fit(trainer.params.clone(), FitConfig(batch_size=5), bad)


def test_trainable_only_exchange_keeps_frozen_params_local():
    m = model()
    m[0].weight.requires_grad_(False)
    trainer = TorchTrainer(m, exchange="trainable")
    assert trainer.params.spec.names == ["0.bias", "2.weight", "2.bias"]
    update = trainer.fit(trainer.params.clone(), dataclasses.replace(FitConfig(), batch_size=8), data())
    assert set(update.params.tensors()) == {"0.bias", "2.weight", "2.bias"}
