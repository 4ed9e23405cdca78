"""Attacker behaviours for simulated clients, to evaluate defences (``fedfleet.robust``).

Each is a party-side transform of the aggregation pipeline, registered by name in ``fedfleet.transforms``:
``transforms: {client: [{name: sign_flip, fraction: 0.2}]}`` makes a fixed, seeded 20% of the population
send flipped updates. ``sign_flip`` (scale), ``scale`` (boost: model replacement), ``gaussian`` (sigma).
Label flipping needs the clients' data rather than their updates and is not here (docs/robust-aggregation.md).
"""

from fedfleet.attacks.base import Attack
from fedfleet.attacks.gaussian import GaussianNoise
from fedfleet.attacks.scale import Scale
from fedfleet.attacks.sign_flip import SignFlip

__all__ = ["Attack", "GaussianNoise", "Scale", "SignFlip"]
