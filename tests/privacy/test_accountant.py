"""The accountant against dp-accounting's own computation, calibration, the budget, and its state."""

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedfleet.errors import ConfigError
from fedfleet.privacy import Accountant, Budget, PrivacyBudgetSpent, calibrate
from fedfleet.privacy.accountant import gaussian_epsilon


def composed(accountant, q: float, z: float, rounds: int) -> float:
    for _ in range(rounds):
        accountant.compose(q, z)
    return accountant.epsilon()


@pytest.mark.parametrize("q, z, rounds", [(0.05, 1.1, 60), (0.2, 0.8, 10), (1.0, 3.0, 25)])
def test_epsilon_matches_dp_accountings_own_composition(q, z, rounds):
    mine_pld = composed(Accountant("pld", 1e-5, "poisson", 1000), q, z, rounds)
    mine_rdp = composed(Accountant("rdp", 1e-5, "poisson", 1000), q, z, rounds)
    event = dp_event.GaussianDpEvent(z) if q == 1 else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, rounds)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, rounds)
    assert mine_pld == pytest.approx(pld.get_epsilon(1e-5), rel=1e-3)  # q = 1: the exact formula, PLD discretised
    assert mine_rdp == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert mine_pld < mine_rdp  # why PLD is the default


def test_fixed_size_sampling_is_rdp_under_replace_one_with_sensitivity_2c():
    mine = composed(Accountant("rdp", 1e-5, "fixed", 1000), 0.05, 1.2, 30)
    rdp = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    rdp.compose(dp_event.SampledWithoutReplacementDpEvent(1000, 50, dp_event.GaussianDpEvent(0.6)), 30)
    assert mine == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(ConfigError, match=r"with privacy\.sampling: fixed use accountant: rdp"):
        Accountant("pld", 1e-5, "fixed", 1000)


def test_the_exact_gaussian_formula_is_what_a_pld_converges_to():
    for sigma, delta in [(1.0, 1e-5), (0.8, 1e-6), (5.0, 1e-3)]:
        pld = pld_privacy_accountant.PLDAccountant()
        pld.compose(dp_event.GaussianDpEvent(sigma))
        assert gaussian_epsilon(sigma, delta) == pytest.approx(pld.get_epsilon(delta), rel=2e-3)
    assert gaussian_epsilon(100.0, 0.5) == 0.0


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_calibration_spends_the_budget_and_no_more(kind):
    z = calibrate(kind, "poisson", 4.0, 1e-5, 0.05, 50, 2000)
    accountant = Accountant(kind, 1e-5, "poisson", 2000)
    eps = composed(accountant, 0.05, z, 50)
    assert 3.95 < eps <= 4.0
    assert accountant.epsilon_after(0.05, z / 1.01, 0) == eps  # zero more rounds change nothing
    assert Accountant(kind, 1e-5, "poisson", 2000).epsilon_after(0.05, z * 0.99, 50) > 4.0  # less noise: over


def test_the_state_recomposes_to_the_same_epsilon_and_keeps_runs_short():
    a = Accountant("pld", 1e-5, "poisson", 1000)
    for z in [1.0] * 30 + [0.9] * 5 + [1.0] * 3:
        a.compose(0.1, z)
    assert a.state_dict() == {"runs": [[0.1, 1.0, 30], [0.1, 0.9, 5], [0.1, 1.0, 3]]}
    b = Accountant("pld", 1e-5, "poisson", 1000)
    b.load_state_dict(a.state_dict())
    assert b.epsilon() == a.epsilon() and b.rounds == 38


def test_the_budget_refuses_the_round_that_would_pass_it():
    a = Accountant("rdp", 1e-5, "poisson", 1000)
    budget = Budget(epsilon=4.0)
    rounds = 0
    with pytest.raises(PrivacyBudgetSpent, match=r"would take epsilon from .* past privacy.epsilon = 4"):
        while True:
            budget.check_next(a, 0.1, 1.0)
            a.compose(0.1, 1.0)
            rounds += 1
    assert a.epsilon() <= 4.0 < a.epsilon_after(0.1, 1.0) and rounds > 1


def test_a_tiny_noise_multiplier_is_sent_to_rdp_not_left_to_eat_the_memory():
    with pytest.raises(ConfigError, match=r"use privacy\.accountant: rdp"):
        Accountant("pld", 1e-5, "none", 3).compose(1.0, 0.05)
