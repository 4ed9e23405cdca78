"""Differential privacy at the party: clip, then add Gaussian noise before the update leaves.

- ``distributed`` (with secure aggregation): each of the m expected parties adds N(0, (z C)^2 / m), so the sum
  the arbiter unmasks carries N(0, (z C)^2) when all m take part, and less when some drop out (the ledger
  accounts for the parties that actually survived: ``ledger.py``). Clipping comes before quantisation
  because secure aggregation quantises what this transform returns.
- ``local``: each party adds N(0, (z C)^2), so every update is private on its own, even from the arbiter.

The weight becomes a constant (``weight``): a party's example count would otherwise scale its contribution past C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import Update
from fedfleet.privacy.clipping import CLIPPERS
from fedfleet.privacy.noise import NoiseSource, add_gaussian_, noise_key


@dataclass(frozen=True)
class PartyGaussian:
    clip: float
    std: float  # of the noise this party adds, per coordinate
    per_layer: bool = False
    weight: float = 1.0
    noise: NoiseSource = NoiseSource.SECURE
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0 and math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"dp at the party needs clip > 0 and noise std >= 0, got {self.clip}, {self.std}")

    def __call__(self, update: Update, context: TransformContext) -> Update:
        if not update.is_delta:
            raise ValueError("DP clips a delta; this update carries the params themselves (is_delta=False)")
        CLIPPERS[self.per_layer](update.params, self.clip)
        key = noise_key(self.noise, self.seed, context.round, f"party-{context.client_id}-{context.seed}")
        add_gaussian_(update.params, self.std, key)
        update.weight = self.weight
        return update
