"""Each robust aggregator stays within its theoretical bound of the honest mean under f attackers.

Seeded synthetic rounds: n updates, f of them attackers that send their delta sign-flipped, boosted x10, or
flipped and boosted x100. Each test's docstring states the bound it checks; ``h`` is the honest updates,
``mean_h`` their mean.
"""

import math

import pytest
import torch

from tests.robust.helpers import ATTACKS, aggregate, honest, result, with_attackers

CASES = [(11, 2), (20, 4)]  # (n, f): the largest f Bulyan admits for each n (n >= 4f + 3)


def order_bounds(h: torch.Tensor, f: int, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule's value per coordinate with the f attackers all at -inf and all at +inf: a coordinate-wise
    order-statistic rule is monotone in each input, so these bound it whatever the attackers send.
    ``keep(n)`` is the (start, stop) of the sorted positions the rule averages."""
    n, s = len(h) + f, h.sort(dim=0).values
    start, stop = keep(n)
    low = s[start - f : stop - f].double().mean(0)  # attackers first: honest positions shift down by f
    high = s[start:stop].double().mean(0)  # attackers last
    return low, high


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_median_lies_between_the_honest_order_statistics(n, f, attack):
    """Median, f < n/2: coordinate j lies in [median of (h_j + f x -inf), median of (h_j + f x +inf)], i.e.
    between the honest order statistics ((n-1)//2 - f, n//2 - f) and ((n-1)//2, n//2)."""
    h = honest(n - f)
    out = result(aggregate("median", {}, with_attackers(h, f, attack))).double()
    mid = [(n - 1) // 2, n // 2]
    s = h.sort(dim=0).values.double()
    low, high = (s[mid[0] - f] + s[mid[1] - f]) / 2, (s[mid[0]] + s[mid[1]]) / 2
    assert torch.all(out >= low - 1e-6) and torch.all(out <= high + 1e-6)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_trimmed_mean_lies_between_the_means_of_the_honest_values_it_can_keep(n, f, attack):
    """Trimmed mean, b = floor(beta n) >= f: coordinate j lies between mean(sorted h_j[b - f : n - b - f]) and
    mean(sorted h_j[b : n - b]) (the attackers at -inf, then at +inf)."""
    beta = f / n + 1e-3
    b = math.floor(beta * n)
    h = honest(n - f)
    out = result(aggregate("trimmed_mean", {"beta": beta}, with_attackers(h, f, attack))).double()
    low, high = order_bounds(h, f, lambda n: (b, n - b))
    assert b == f
    assert torch.all(out >= low - 1e-6) and torch.all(out <= high + 1e-6)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_krum_is_within_its_bound_and_chooses_honest_updates(n, f, attack, m):
    """(Multi-)Krum, n >= 2f + 3: ||krum - mean_h|| <= (sqrt(n - f - 2) + 1) D, D the largest distance between
    two honest updates (every chosen update has an honest neighbour within sqrt(n - f - 2) D). With these
    attackers far from the honest cluster, every chosen update is an honest one: within D of mean_h."""
    h = honest(n - f)
    out = result(aggregate("krum", {"f": f, "m": m}, with_attackers(h, f, attack)))
    d = torch.cdist(h.double(), h.double()).max()
    err = (out.double() - h.double().mean(0)).norm()
    assert err <= (math.sqrt(n - f - 2) + 1) * d
    assert err <= d
    if m == 1:
        assert min(float((out - row).abs().max()) for row in h) < 1e-6  # one of the honest updates itself


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_bulyan_is_within_twice_the_honest_range_of_the_honest_mean(n, f, attack):
    """Bulyan, n >= 4f + 3: |bulyan_j - mean_h_j| <= 2 (max_h_j - min_h_j) at every coordinate j."""
    h = honest(n - f)
    out = result(aggregate("bulyan", {"f": f}, with_attackers(h, f, attack))).double()
    spread = h.max(0).values - h.min(0).values
    assert torch.all((out - h.double().mean(0)).abs() <= 2 * spread.double() + 1e-6)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_geometric_median_is_within_minskers_bound(n, f, attack):
    """Geometric median, attackers' share alpha = f/n < 1/2: ||gm - mean_h|| <= (1 - alpha) / sqrt(1 - 2 alpha) r,
    r = max_h ||h - mean_h|| (Minsker 2015, Lemma 2.1), reached here by the default five Weiszfeld steps."""
    h = honest(n - f)
    out = aggregate("geomedian", {}, with_attackers(h, f, attack))
    alpha = f / n
    r = (h - h.mean(0)).norm(dim=1).max()
    assert (result(out) - h.mean(0)).norm() <= (1 - alpha) / math.sqrt(1 - 2 * alpha) * r
    assert out.metrics["robust_iters"] <= 5


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_centered_clipping_is_within_its_bound(n, f, attack, iters):
    """Centered clipping from v0 = 0 with tau above every honest distance to the iterates: after L iterations
    ||v - mean_h|| <= (f/n)^L ||mean_h|| + tau (f/n) / (1 - f/n)."""
    h = honest(n - f)
    tau = 2 * float(h.norm(dim=1).max())  # the iterates stay between 0 and mean_h: no honest update is clipped
    out = result(aggregate("centered_clip", {"tau": tau, "iters": iters}, with_attackers(h, f, attack)))
    q = f / n
    assert (out - h.mean(0)).norm() <= q**iters * h.mean(0).norm() + tau * q / (1 - q) + 1e-5


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("n", "f"), CASES)
def test_norm_bounding_limits_each_attacker_to_its_share_of_the_bound(n, f, attack):
    """Norm bound M >= every honest norm, equal weights: ||mean - mean_h|| <= (f/n) (M + ||mean_h||)."""
    h = honest(n - f)
    bound = float(h.norm(dim=1).max())
    out = result(aggregate("norm_bound", {"max_norm": bound}, with_attackers(h, f, attack)))
    assert (out - h.mean(0)).norm() <= f / n * (bound + h.mean(0).norm()) + 1e-5


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_plain_mean_is_not_within_these_bounds(attack):
    """The same rounds through FedAvg's mean alone: the boosted attacks move it far from mean_h (the bounds
    above are not vacuous), and even plain sign flips pull it back by 2f/n of the honest step."""
    h = honest(16)
    rows = with_attackers(h, 4, attack)
    err = (rows.mean(0) - h.mean(0)).norm()
    assert err > 0.35 * h.mean(0).norm()
