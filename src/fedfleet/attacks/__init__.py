"""Attacker behaviours for simulated clients, to evaluate defences (``fedfleet.robust``).

Each is a party-side transform of the aggregation pipeline, registered by name in ``fedfleet.transforms``:
``transforms: {client: [{name: sign_flip, fraction: 0.2}]}`` makes a fixed, seeded 20% of the population
send flipped updates. ``sign_flip`` (scale), ``scale`` (boost: model replacement), ``gaussian`` (sigma),
``label_flip`` (trains on flipped labels: the simulation poisons the attackers' data when the job is assembled).
"""

from fedfleet.attacks.base import Attack
from fedfleet.attacks.gaussian import GaussianNoise
from fedfleet.attacks.label_flip import LabelFlip
from fedfleet.attacks.scale import Scale
from fedfleet.attacks.sign_flip import SignFlip

__all__ = ["Attack", "GaussianNoise", "LabelFlip", "Scale", "SignFlip"]
