import time

import numpy as np
import pytest
import torch

from fedfleet.data import PARTITIONERS, FederatedDataset, partition
from fedfleet.errors import ConfigError

LABEL_SCHEMES = [n for n in PARTITIONERS.names() if n != "natural"]
LABELS = np.random.default_rng(0).integers(0, 10, size=2000)


@pytest.mark.parametrize("scheme", LABEL_SCHEMES)
def test_every_sample_assigned_exactly_once_and_seeded(scheme):
    p = partition(scheme, LABELS, 50, seed=1)
    assert p.num_clients == 50
    assert sorted(p.order.tolist()) == list(range(len(LABELS)))
    assert p.offsets[0] == 0 and p.offsets[-1] == len(LABELS) and (np.diff(p.offsets) >= 1).all()
    again = partition(scheme, LABELS, 50, seed=1)
    assert np.array_equal(p.order, again.order) and np.array_equal(p.offsets, again.offsets)
    other = partition(scheme, LABELS, 50, seed=2)
    assert not np.array_equal(p.order, other.order)


def label_skew(p) -> float:
    """Mean over clients of the share of its most common label (1.0 = one label per client)."""
    return float(np.mean([np.bincount(LABELS[p.client(i)]).max() / len(p.client(i)) for i in range(p.num_clients)]))


def test_dirichlet_alpha_controls_label_skew():
    skewed = label_skew(partition("dirichlet", LABELS, 20, seed=0, alpha=0.1))
    mild = label_skew(partition("dirichlet", LABELS, 20, seed=0, alpha=100.0))
    assert skewed > 0.5 > mild


def test_dirichlet_repairs_empty_clients():
    labels = np.random.default_rng(0).integers(0, 10, size=300)
    p = partition("dirichlet", labels, 100, seed=0, alpha=0.05, min_size=2)
    assert p.sizes().min() >= 2


def test_shards_give_at_most_shards_per_client_labels():
    labels = np.repeat(np.arange(10), 100)
    p = partition("shards", labels, 50, seed=0, shards_per_client=2)
    assert max(len(np.unique(labels[p.client(i)])) for i in range(50)) <= 2


def test_natural_groups_by_key_and_can_subsample():
    keys = np.array(["u1", "u2", "u1", "u3", "u2", "u1"])
    p = partition("natural", keys, None, seed=0)
    groups = sorted(sorted(keys[p.client(i)].tolist()) for i in range(p.num_clients))
    assert groups == [["u1", "u1", "u1"], ["u2", "u2"], ["u3"]]
    sub = partition("natural", keys, 2, seed=0)
    assert sub.num_clients == 2 and all(len(set(keys[sub.client(i)])) == 1 for i in range(2))


@pytest.mark.parametrize(
    ("scheme", "params", "message"),
    [
        ("dirichlet", {"alpha": 0}, "alpha must be > 0"),
        ("dirichlet", {"alhpa": 1}, "did you mean 'alpha'"),
        ("iid", {"alpha": 1}, "unknown key 'alpha' for partition 'iid'"),
        ("shards", {"shards_per_client": 0}, "shards_per_client must be >= 1"),
        ("dirichlet_typo", {}, "unknown partitioner"),
    ],
)
def test_bad_partition_params(scheme, params, message):
    with pytest.raises(ConfigError, match=message):
        partition(scheme, LABELS, 10, seed=0, **params)


def test_more_clients_than_samples_is_refused():
    with pytest.raises(ConfigError, match="between 1 and the 2000"):
        partition("iid", LABELS, 5000, seed=0)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_100k_clients_over_1m_samples_is_fast(scheme):
    labels = np.random.default_rng(0).integers(0, 10, size=1_000_000)
    t = time.perf_counter()
    p = partition(scheme, labels, 100_000, seed=0)
    assert time.perf_counter() - t < 10
    assert p.num_clients == 100_000 and p.sizes().min() >= 1


def test_federated_dataset_clients_are_views_in_partition_order():
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    y = torch.arange(20) % 4
    p = partition("iid", y.numpy(), 5, seed=0)
    fed = FederatedDataset.from_partition(x, y, p, 4)
    for i in range(5):
        c = fed.client(i)
        assert c.x.untyped_storage().data_ptr() == fed.x.untyped_storage().data_ptr()
        assert torch.equal(c.y, y[torch.from_numpy(p.client(i))])
        assert torch.equal(c.x, x[torch.from_numpy(p.client(i))])
    assert fed.sizes().tolist() == p.sizes().tolist()


def test_natural_leaves_out_users_outside_min_and_max_samples_as_fedscales_filters_do():
    """FedScale's filter_less / filter_more: a user with fewer than min_samples (more than max_samples) is left out."""
    keys = np.array(["a"] * 1 + ["b"] * 3 + ["c"] * 5 + ["d"] * 8)
    p = partition("natural", keys, None, seed=0, min_samples=3, max_samples=5)
    assert sorted(keys[p.client(i)][0] for i in range(p.num_clients)) == ["b", "c"]
    assert sorted(p.order.tolist()) == list(range(1, 9))  # b's and c's rows, each once
    sub = partition("natural", keys, 1, seed=0, min_samples=4)  # one user drawn among the eligible c, d
    assert sub.num_clients == 1 and set(keys[sub.client(0)]) <= {"c", "d"} and len(sub.client(0)) >= 4


@pytest.mark.parametrize(
    ("params", "clients", "message"),
    [
        ({"min_samples": 9}, None, r"leave no user: none has at least 9 samples \(users hold 1 to 8\)"),
        ({"min_samples": 4, "max_samples": 3}, None, "min_samples 4 is larger than data.partition.max_samples 3"),
        ({"min_samples": 0}, None, "data.partition.min_samples must be >= 1, got 0"),
        ({"min_samples": 4}, 3, "between 1 and the 2 users with at least 4 samples, got 3"),
    ],
)
def test_natural_sample_bounds_that_leave_nothing_are_named(params, clients, message):
    keys = np.array(["a"] * 1 + ["b"] * 3 + ["c"] * 5 + ["d"] * 8)
    with pytest.raises(ConfigError, match=message):
        partition("natural", keys, clients, seed=0, **params)
