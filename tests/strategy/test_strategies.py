"""Each strategy on numbers small enough to check by hand (float64 reference computations)."""

import math

import pytest
import torch

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import TrainStats, Update
from fedfleet.errors import ConfigError
from fedfleet.strategy import build_strategy


def vec(*values: float) -> FlatParams:
    return FlatParams.from_tensors({"w": torch.tensor(values, dtype=torch.float64)})


def step(name: str, w: FlatParams, updates: list[Update], state=None, **hp) -> tuple[FlatParams, dict]:
    strategy = build_strategy(name, **hp)
    state = strategy.init_state(w) if state is None else state
    agg = strategy.aggregator(w)
    for u in updates:
        agg.add(u)
    strategy.server_step(w, agg.finish(), state)
    return w, state


def two_clients() -> list[Update]:
    return [Update(vec(1.0, 1.0), weight=1), Update(vec(4.0, 4.0), weight=2)]  # weighted mean: [3, 3]


def test_fedavg_adds_the_example_weighted_mean_delta():
    w, _ = step("fedavg", vec(1.0, 2.0), two_clients())
    assert w.tensors()["w"].tolist() == [4.0, 5.0]
    w, _ = step("fedavg", vec(1.0, 2.0), two_clients(), server_lr=0.5)
    assert w.tensors()["w"].tolist() == [2.5, 3.5]


def test_fedprox_server_is_fedavg_and_sets_mu_for_clients():
    strategy = build_strategy("fedprox", mu=0.3)
    assert strategy.configure_fit(FitConfig(lr=0.1)).proximal_mu == 0.3
    w, _ = step("fedprox", vec(1.0, 2.0), two_clients(), mu=0.3)
    assert w.tensors()["w"].tolist() == [4.0, 5.0]


def test_fedavgm_momentum_over_two_rounds():
    w, state = step("fedavgm", vec(0.0), [Update(vec(1.0), 1)], momentum=0.5)
    assert w.tensors()["w"].tolist() == [1.0]  # m = 1
    w, state = step("fedavgm", w, [Update(vec(1.0), 1)], state=state, momentum=0.5)
    assert w.tensors()["w"].tolist() == [2.5]  # m = 0.5 * 1 + 1 = 1.5


def fedopt_reference(rule: str, deltas: list[float], lr=0.1, b1=0.9, b2=0.99, tau=1e-3) -> float:
    """Reddi et al. Algorithm 2 on one scalar, in plain Python floats."""
    w, m, v = 0.0, 0.0, tau * tau
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if rule == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        elif rule == "fedyogi":
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        else:
            v = v + d * d
        w = w + lr * m / (math.sqrt(v) + tau)
    return w


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizers_match_the_paper_by_hand(name):
    deltas = [0.5, -0.2, 0.05]  # Yogi: v < delta^2 at first, then v > delta^2 for the small last delta
    w, state = vec(0.0), None
    for d in deltas:
        w, state = step(name, w, [Update(vec(d), 1)], state=state, server_lr=0.1)
    assert w.tensors()["w"].item() == pytest.approx(fedopt_reference(name, deltas), rel=1e-12)


def test_first_fedadam_step_by_hand():
    # m = 0.1 * 0.5 = 0.05; v = 0.99 * 1e-6 + 0.01 * 0.25 = 0.00250099; w = 0.1 * 0.05 / (0.0500099 + 0.001)
    w, _ = step("fedadam", vec(0.0), [Update(vec(0.5), 1)], server_lr=0.1)
    assert w.tensors()["w"].item() == pytest.approx(0.005 / (math.sqrt(0.00250099) + 0.001), rel=1e-12)


def test_yogi_sign_rule_moves_v_towards_delta_squared():
    strategy = build_strategy("fedyogi")
    v = torch.tensor([0.0, 1.0], dtype=torch.float64)
    strategy.second_moment(v, torch.tensor([0.25, 0.25], dtype=torch.float64))
    assert v.tolist() == pytest.approx([0.0025, 1.0 - 0.0025])


def test_qfedavg_two_clients_by_hand():
    # L = 2, q = 1. Client a: F = 1, delta = [1, 0] -> Δw = [-2, 0], Δ = [-2, 0], h = 1 * 1 * 4 + 2 = 6
    #               client b: F = 2, delta = [0, 1] -> Δw = [0, -2], Δ = [0, -4], h = 1 * 1 * 4 + 2 * 2 = 8
    # w <- w - (Δa + Δb) / 14 = [2/14, 4/14]
    updates = [
        Update(vec(1.0, 0.0), weight=5, stats=TrainStats(initial_loss=1.0)),
        Update(vec(0.0, 1.0), weight=1, stats=TrainStats(initial_loss=2.0)),
    ]
    w, _ = step("qfedavg", vec(0.0, 0.0), updates, q=1.0, lipschitz=2.0)
    assert w.tensors()["w"].tolist() == pytest.approx([2 / 14, 4 / 14], rel=1e-12)
    assert build_strategy("qfedavg").configure_fit(FitConfig()).report_initial_loss


def test_qfedavg_with_q_zero_is_the_unweighted_mean():
    updates = [
        Update(vec(1.0), weight=100, stats=TrainStats(initial_loss=3.0)),
        Update(vec(3.0), 1, stats=TrainStats(initial_loss=1.0)),
    ]
    w, _ = step("qfedavg", vec(0.0), updates, q=0.0, lipschitz=4.0)
    assert w.tensors()["w"].item() == pytest.approx(2.0)


def test_qfedavg_requires_the_initial_loss():
    with pytest.raises(ValueError, match="initial_loss"):
        step("qfedavg", vec(0.0), [Update(vec(1.0), 1)])


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedavg", {"server_lr": -1.0}, "server_lr must be > 0"),
        ("fedprox", {"mu": -0.1}, "mu must be >= 0"),
        ("fedavgm", {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ("fedadam", {"beta2": 1.5}, r"beta2 must be in \[0, 1\)"),
        ("fedyogi", {"tau": 0.0}, "tau must be > 0"),
        ("qfedavg", {"q": -1.0}, "q must be >= 0"),
    ],
)
def test_bad_hyperparameters_are_config_errors(name, params, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(name, **params)
