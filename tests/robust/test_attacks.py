"""Attacker behaviours for simulated clients: a fixed, seeded fraction of the population, the same every round."""

import pickle
import re

import pytest
import torch

from fedfleet.attacks import GaussianNoise, Scale, SignFlip
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import Update
from fedfleet.errors import ConfigError
from fedfleet.transforms import JobFacts, build_pipeline


def update(values=(3.0, -4.0)) -> Update:
    return Update(FlatParams.from_tensors({"w": torch.tensor(values)}), 1.0)


def ctx(client, rnd=0, seed=11):
    return TransformContext(round=rnd, client_id=client, seed=seed)


def test_exactly_the_fraction_of_the_population_attacks_chosen_by_the_seed():
    attack = SignFlip(fraction=0.2).for_population(100, seed=0)
    assert len(attack.attackers) == 20
    assert attack.attackers == SignFlip(fraction=0.2).for_population(100, seed=0).attackers
    assert attack.attackers != SignFlip(fraction=0.2).for_population(100, seed=1).attackers
    assert attack.attackers == SignFlip(fraction=0.2, seed=0).for_population(100, seed=5).attackers  # its own seed
    assert pickle.loads(pickle.dumps(attack)).attackers == attack.attackers  # a Ray worker's copy agrees
    assert sum(attack.attacks(c) for c in range(100)) == 20
    assert SignFlip(fraction=0.0).for_population(100, 0).attackers == frozenset()
    assert all(SignFlip(fraction=1.0).attacks(c) for c in ["host-1", 7])


def test_without_a_population_each_client_draws_alone():
    """A named party or an API user's pipeline: the fraction holds in expectation, the same every time."""
    attack = SignFlip(fraction=0.3, seed=2)
    drawn = [attack.attacks(f"party-{i}") for i in range(2000)]
    assert 0.27 < sum(drawn) / 2000 < 0.33
    assert drawn == [attack.attacks(f"party-{i}") for i in range(2000)]


def test_the_pipeline_gives_an_attack_the_jobs_population_and_seed():
    (attack,) = build_pipeline(client=[("sign_flip", {"fraction": 0.1})], job=JobFacts(population=50, seed=3)).client
    assert attack.population == 50 and attack.seed == 3 and len(attack.attackers) == 5
    with pytest.raises(
        ConfigError, match=re.escape("transforms.client 'scale': fraction must be a number from 0 to 1")
    ):
        build_pipeline(client=[("scale", {"fraction": 1.5})])
    with pytest.raises(ConfigError, match="unknown key 'sigmaa'"):
        build_pipeline(client=[("gaussian", {"sigmaa": 1.0})])


def test_each_behaviour_changes_only_the_attackers_updates_and_marks_them():
    attack = SignFlip(fraction=0.5).for_population(4, seed=0)
    bad, good = sorted(attack.attackers)[0], sorted(set(range(4)) - attack.attackers)[0]
    flipped = attack(update(), ctx(bad))
    assert flipped.params.tensors()["w"].tolist() == [-3.0, 4.0] and flipped.metrics["attacker"] == 1.0
    honest = attack(update(), ctx(good))
    assert honest.params.tensors()["w"].tolist() == [3.0, -4.0] and honest.metrics["attacker"] == 0.0
    assert SignFlip(fraction=1.0, scale=5).corrupt(update(), ctx(0)).params.tensors()["w"].tolist() == [-15, 20]
    assert Scale(fraction=1.0, boost=10).corrupt(update(), ctx(0)).params.tensors()["w"].tolist() == [30, -40]


def test_gaussian_noise_replaces_the_update_and_repeats_with_the_seed():
    big = Update(FlatParams.from_tensors({"w": torch.ones(20_000)}), 1.0)
    noisy = GaussianNoise(fraction=1.0, sigma=0.5)(big, ctx(3)).params.tensors()["w"]
    assert abs(float(noisy.mean())) < 0.02 and abs(float(noisy.std()) - 0.5) < 0.01
    again = GaussianNoise(fraction=1.0, sigma=0.5)(update((1.0,) * 20_000), ctx(3)).params.tensors()["w"]
    assert torch.equal(noisy, again)
    other = GaussianNoise(fraction=1.0, sigma=0.5)(update((1.0,) * 20_000), ctx(3, seed=12)).params.tensors()["w"]
    assert not torch.equal(noisy, other)
