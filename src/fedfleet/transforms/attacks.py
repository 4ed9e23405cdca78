"""Attacker behaviours for simulated clients (``fedfleet.attacks``) as party-side transforms: one registration
each; ``fraction`` of the population misbehaves (``transforms: {client: [{name: sign_flip, fraction: 0.2}]}``)."""

from fedfleet.attacks import GaussianNoise, LabelFlip, Scale, SignFlip
from fedfleet.transforms.base import PARTY_TRANSFORMS

PARTY_TRANSFORMS.add("sign_flip", SignFlip)
PARTY_TRANSFORMS.add("scale", Scale)
PARTY_TRANSFORMS.add("gaussian", GaussianNoise)
PARTY_TRANSFORMS.add("label_flip", LabelFlip)
