"""Partitioners: how a dataset's samples are dealt out to virtual clients. One function each, registered.

Each returns a :class:`Partition` (sample order grouped by client + offsets) and is vectorised with
numpy, so 100,000 clients over 1,000,000 samples take well under a second.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedfleet.data.federated import Partition
from fedfleet.errors import ConfigError
from fedfleet.registry import Registry, construct

PartitionFn = Callable[..., Partition]
PARTITIONERS: Registry[PartitionFn] = Registry("partitioner")


def from_owners(owner: np.ndarray, num_clients: int) -> Partition:
    """Group samples by their owner id (stable, so within a client the dataset's order is kept)."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    counts = np.bincount(owner, minlength=num_clients)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Partition(order, offsets)


def _check_clients(num_clients: int, num_samples: int) -> None:
    if not 1 <= num_clients <= num_samples:
        raise ConfigError(f"data.clients must be between 1 and the {num_samples} training samples, got {num_clients}")


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
    """A random split into equal shares (sizes differ by at most one)."""
    n = len(labels)
    _check_clients(num_clients, n)
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.arange(n) * num_clients // n
    return from_owners(owner, num_clients)


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float = 0.5, min_size: int = 1
) -> Partition:
    """Label skew (Hsu et al. 2019): each class is split over clients with Dirichlet(alpha) proportions.

    Small alpha gives each client few classes; large alpha approaches IID. Clients left with fewer than
    ``min_size`` samples take them from the largest clients, so no client is empty (a deterministic
    repair instead of resampling, which never terminates for 100,000 clients with few samples each).
    """
    n = len(labels)
    _check_clients(num_clients, n)
    if alpha <= 0:
        raise ConfigError(f"data.partition.alpha must be > 0, got {alpha}; 0.1 is very skewed, 100 nearly IID")
    if not 0 <= min_size * num_clients <= n:
        raise ConfigError(f"data.partition.min_size {min_size} x {num_clients} clients exceeds the {n} samples")
    owner = np.empty(n, dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        counts = rng.multinomial(len(members), shares)
        owner[members] = np.repeat(np.arange(num_clients), counts)
    _repair_small(owner, num_clients, min_size, rng)
    return from_owners(owner, num_clients)


def _repair_small(owner: np.ndarray, num_clients: int, min_size: int, rng: np.random.Generator) -> None:
    counts = np.bincount(owner, minlength=num_clients)
    short = np.flatnonzero(counts < min_size)
    if len(short) == 0:
        return
    need = np.repeat(short, min_size - counts[short])  # one entry per sample to hand over
    # donors: samples of clients that can spare them, largest clients first
    spare = counts - min_size
    donor_clients = np.argsort(-spare, kind="stable")
    taken = 0
    for donor in donor_clients:
        if taken == len(need) or spare[donor] <= 0:
            break
        give = min(int(spare[donor]), len(need) - taken)
        samples = rng.choice(np.flatnonzero(owner == donor), size=give, replace=False)
        owner[samples] = need[taken : taken + give]
        taken += give


@PARTITIONERS.register("shards")
def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator, shards_per_client: int = 2) -> Partition:
    """McMahan et al. 2017's pathological non-IID split: sort by label, cut into shards, deal them out."""
    n = len(labels)
    _check_clients(num_clients, n)
    if shards_per_client < 1 or num_clients * shards_per_client > n:
        raise ConfigError(
            f"data.partition.shards_per_client must be >= 1 and clients x shards <= {n} samples, "
            f"got {shards_per_client}"
        )
    by_label = np.lexsort((rng.random(n), labels))  # sorted by label, random within a label
    num_shards = num_clients * shards_per_client
    shard_of_position = np.arange(n) * num_shards // n
    owner_of_shard = rng.permutation(num_shards) % num_clients
    owner = np.empty(n, dtype=np.int64)
    owner[by_label] = owner_of_shard[shard_of_position]
    return from_owners(owner, num_clients)


@PARTITIONERS.register("natural")
def natural(
    keys: np.ndarray,
    num_clients: int | None,
    rng: np.random.Generator,
    min_samples: int = 1,
    max_samples: int | None = None,
) -> Partition:
    """One client per distinct user key (e.g. a writer, a user id): the data's own federation.

    Users with fewer than ``min_samples`` or more than ``max_samples`` samples are left out (their rows
    join no client), as FedScale's ``filter_less`` / ``filter_more`` leave them out of selection. With
    ``num_clients`` set, a random subset of that many of the remaining users is kept.
    """
    if keys is None:
        raise ConfigError("the natural partition needs per-sample user keys; this dataset has none (use dirichlet)")
    users, owner = np.unique(np.asarray(keys), return_inverse=True)
    owner = owner.astype(np.int64)
    eligible = _eligible(np.bincount(owner, minlength=len(users)), min_samples, max_samples)
    if num_clients is None and len(eligible) == len(users):
        return from_owners(owner, len(users))
    count = len(eligible) if num_clients is None else num_clients
    if not 1 <= count <= len(eligible):
        among = "users" if len(eligible) == len(users) else f"users with {_bounds(min_samples, max_samples)} samples"
        raise ConfigError(f"data.clients must be between 1 and the {len(eligible)} {among}, got {num_clients}")
    kept = eligible if count == len(eligible) else np.sort(rng.choice(eligible, size=count, replace=False))
    new_id = np.full(len(users), -1, dtype=np.int64)
    new_id[kept] = np.arange(count)
    mine = new_id[owner]
    sub = from_owners(mine[mine >= 0], count)
    return Partition(np.flatnonzero(mine >= 0)[sub.order], sub.offsets)


def _eligible(sizes: np.ndarray, min_samples: int, max_samples: int | None) -> np.ndarray:
    """Indices of the users whose sample counts lie inside the bounds (all of them by default)."""
    if min_samples < 1:
        raise ConfigError(f"data.partition.min_samples must be >= 1, got {min_samples}")
    if max_samples is not None and max_samples < min_samples:
        raise ConfigError(
            f"data.partition.min_samples {min_samples} is larger than data.partition.max_samples {max_samples}"
        )
    inside = sizes >= min_samples
    if max_samples is not None:
        inside &= sizes <= max_samples
    if not inside.any():
        raise ConfigError(
            f"data.partition min_samples / max_samples leave no user: none has {_bounds(min_samples, max_samples)} "
            f"samples (users hold {int(sizes.min())} to {int(sizes.max())})"
        )
    return np.flatnonzero(inside)


def _bounds(low: int, high: int | None) -> str:
    return f"at least {low}" if high is None else f"{low} to {high}"


def partition(scheme: str, labels: np.ndarray, num_clients: int | None, seed: int, **params: object) -> Partition:
    """Look up ``scheme`` and run it with a generator seeded by ``seed``; bad params are ConfigErrors.

    ``labels`` are the per-sample labels, or the per-sample user keys for the ``natural`` scheme.
    """
    fn = PARTITIONERS.get(scheme)
    if scheme != "natural" and num_clients is None:
        raise ConfigError(f"the {scheme} partition needs data.clients")
    rng = np.random.default_rng(seed)
    data = None if labels is None else np.asarray(labels)
    return construct(
        lambda **kw: fn(data, num_clients, rng, **kw), params, f"partition {scheme!r}", signature_of=fn, skip=3
    )
