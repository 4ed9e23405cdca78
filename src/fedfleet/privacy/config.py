"""The ``privacy:`` section of a job: a budget the user can state, and what it takes to keep it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedfleet.errors import ConfigError
from fedfleet.privacy.adaptive import AdaptiveClipConfig

WHERE = ("central", "distributed", "local")


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level (epsilon, delta) differential privacy for FedAvg-family strategies.

    ``epsilon``: the budget at ``delta``; without ``noise_multiplier`` the noise is calibrated to spend it over
    the planned rounds. ``noise_multiplier`` (z): noise std / clip; with ``epsilon`` too, the run stops before
    a round that would pass it. ``clip``: the L2 bound C of each update's delta (the initial one with
    ``adaptive``), ``per_layer``: C / sqrt(L) per tensor. ``where``: central (the arbiter clips and noises the
    sum) | distributed (each party adds its share of the noise, under secure aggregation) | local (each party
    noises its own update fully). ``sampling``: how the accountant models the draw of a round's clients:
    poisson (each with probability cohort / clients; the selection then draws that way) | fixed (exactly
    cohort, uniformly) | none (no amplification: every party every round, or availability traces decide).
    ``accountant``: pld (tighter) | rdp. ``noise``: secure (keys from the OS) | seeded (reproducible: tests)."""

    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip: float = 1.0
    per_layer: bool = False
    adaptive: AdaptiveClipConfig | None = None
    where: Literal["central", "distributed", "local"] = "central"
    sampling: Literal["poisson", "fixed", "none"] = "poisson"
    accountant: Literal["pld", "rdp"] = "pld"
    noise: Literal["secure", "seeded"] = "secure"

    def __post_init__(self) -> None:
        if self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError(
                "privacy needs epsilon (the budget; the noise is calibrated to it) or noise_multiplier, e.g. "
                "privacy: {epsilon: 8, delta: 1e-5}"
            )
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"privacy.epsilon must be a finite number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        z = self.noise_multiplier
        if z is not None and not (math.isfinite(z) and z > 0):
            raise ConfigError(f"privacy.noise_multiplier must be a finite number > 0, got {z}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"privacy.clip must be a finite number > 0, got {self.clip}")
        if self.adaptive is not None and self.where != "central":
            raise ConfigError(
                f"privacy.adaptive needs each update's norm at the arbiter (where: central); with where: "
                f"{self.where} give a fixed clip"
            )
        if self.accountant == "pld" and self.sampling == "fixed":
            raise ConfigError("privacy: accountant pld covers sampling poisson or none; with sampling fixed use rdp")
