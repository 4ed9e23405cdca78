"""Invariants that every registered strategy must keep (new strategies are covered automatically)."""

import pytest
import torch

from fedfleet.core.params import FlatParams
from fedfleet.core.update import TrainStats, Update
from fedfleet.errors import ConfigError
from fedfleet.strategy import STRATEGIES, build_strategy

NAMES = STRATEGIES.names()


def params(seed: int, scale: float = 1.0) -> FlatParams:
    gen = torch.Generator().manual_seed(seed)
    return FlatParams.from_tensors(
        {
            "a": scale * torch.randn(3, 2, generator=gen),
            "b": scale * torch.randn(4, generator=gen, dtype=torch.float64),
        }
    )


def updates(n: int = 4) -> list[Update]:
    return [Update(params(10 + i, 0.1), weight=float(i + 1), stats=TrainStats(initial_loss=1.0 + i)) for i in range(n)]


def run(name: str, ups: list[Update], w: FlatParams | None = None, state=None):
    strategy = build_strategy(name)
    w = params(0) if w is None else w
    state = strategy.init_state(w) if state is None else state
    agg = strategy.aggregator(w)
    for u in ups:
        agg.add(u)
    strategy.server_step(w, agg.finish(), state)
    return w, state


def test_every_strategy_is_covered():
    assert {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "qfedavg"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_update_order_does_not_matter(name):
    ups = updates()
    a, _ = run(name, ups)
    b, _ = run(name, list(reversed(ups)))
    assert a.allclose(b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_zero_deltas_leave_the_model_unchanged(name):
    zero = [Update(params(1).zero_(), weight=2.0, stats=TrainStats(initial_loss=1.0)) for _ in range(3)]
    w, _ = run(name, zero)
    assert w.allclose(params(0), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_layout_dtypes_and_finiteness_are_kept(name):
    w, _ = run(name, updates())
    assert w.spec == params(0).spec
    assert {d: b.dtype for d, b in w.buffers.items()} == {torch.float32: torch.float32, torch.float64: torch.float64}
    assert w.isfinite()
    assert not w.allclose(params(0))  # something moved


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_a_checkpoint_copy(name):
    w1, state = run(name, updates())
    saved_w, saved_state = w1.clone(), {k: v.clone() for k, v in state.items()}
    a, _ = run(name, updates(2), w1, state)
    b, _ = run(name, updates(2), saved_w, saved_state)
    assert a.allclose(b, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_duplicated_client_equals_doubled_weight(name):
    """The same update twice equals it once with twice the weight (for weight-based strategies) or
    counted twice (q-FedAvg ignores weights, and a duplicate is then just another identical client)."""
    one = Update(params(5, 0.1), weight=2.0, stats=TrainStats(initial_loss=1.5))
    twice, _ = run(name, [one, one])
    doubled = Update(params(5, 0.1), weight=4.0, stats=TrainStats(initial_loss=1.5))
    single, _ = run(name, [doubled])
    assert twice.allclose(single, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_is_a_config_error(name):
    with pytest.raises(ConfigError, match="unknown key 'not_a_key'"):
        build_strategy(name, not_a_key=1)


@pytest.mark.parametrize("name", NAMES)
def test_merged_partials_equal_one_fold_of_every_update(name):
    """What a Ray worker or a sub-arbiter does: fold a share, send the partial, merge it at the top."""
    ups = updates(5)
    expected, _ = run(name, ups)
    strategy = build_strategy(name)
    w = params(0)
    top, left, right = (strategy.aggregator(w) for _ in range(3))
    for u in ups[:2]:
        left.add(u)
    for u in ups[2:]:
        right.add(u)
    top.merge(left)
    top.merge(right)
    aggregate = top.finish()
    assert aggregate.count == 5
    strategy.server_step(w, aggregate, strategy.init_state(w))
    assert w.allclose(expected, rtol=1e-6, atol=1e-7)


def test_a_partial_of_another_kind_is_refused():
    w = params(0)
    fedavg, qfedavg = build_strategy("fedavg").aggregator(w), build_strategy("qfedavg").aggregator(w)
    with pytest.raises(TypeError, match="cannot merge"):
        fedavg.merge(qfedavg)
    with pytest.raises(TypeError, match="cannot merge"):
        qfedavg.merge(fedavg)
