"""Distributed DP under secure aggregation over real gRPC: four parties on mutual TLS, one drops out after its
shares; the round completes with three and the epsilon accounts for the three noise shares that were summed."""

import math

from fedfleet.jobs.simulation import Simulation
from tests.runtime.grpc.secure_helpers import PARTIES4, secure_federation
from tests.runtime.grpc.test_secure_rounds import FailsOnceAtMasking, largest_difference

# each party adds noise of std 2 x 0.5 / sqrt(4) = 0.5: coordinates stay within 0.5 + 6 x 0.5 < 4
SECURE = "secure_aggregation: {clip: 4.0, bits: 20}\n"
PRIVACY = "privacy: {noise_multiplier: 2.0, clip: 0.5, where: distributed, sampling: none, noise: seeded}\n"


def test_a_dropout_leaves_less_noise_and_the_epsilon_says_so(tmp_path):
    FailsOnceAtMasking.failed = set()
    fed = secure_federation(tmp_path, ["rounds=2", "network.min_parties=3"], extra=SECURE + PRIVACY,
                            party_class={PARTIES4[0]: FailsOnceAtMasking})  # fmt: skip
    first, second = fed.run()
    assert first.metrics["clients"] == 3.0 and second.metrics["clients"] == 4.0
    assert first.metrics["dp_parties"] == 3.0
    assert first.metrics["dp_noise_multiplier"] == 2.0 * math.sqrt(3 / 4)  # three of four expected shares
    assert second.metrics["dp_noise_multiplier"] == 2.0
    assert 0 < first.metrics["dp_epsilon"] < second.metrics["dp_epsilon"]
    # the noise is really there: the same job without privacy ends elsewhere, by about the noise's size
    FailsOnceAtMasking.failed = set()
    plain = secure_federation(tmp_path / "plain", ["rounds=2", "network.min_parties=3"], extra=SECURE,
                              party_class={PARTIES4[0]: FailsOnceAtMasking})  # fmt: skip
    plain.run()
    assert largest_difference(fed.arbiter.loop.global_params, plain.arbiter.loop.global_params) > 0.05


def test_the_deployed_run_equals_the_simulated_one_without_dropouts(tmp_path):
    """Seeded noise: each party's share is a function of (seed, round, party), so the deployed secure run and the
    in-process secure simulation of the same job fold the same noisy updates."""
    fed = secure_federation(tmp_path, ["rounds=2"], extra=SECURE + PRIVACY)
    history = fed.run()
    sim = Simulation.from_config(fed.job)
    sim_history = sim.loop.run()
    assert largest_difference(fed.arbiter.loop.global_params, sim.loop.global_params) < 1e-5
    assert history[-1].metrics["dp_epsilon"] == sim_history[-1].metrics["dp_epsilon"]
