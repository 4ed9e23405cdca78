"""FedProx (Li et al., MLSys 2020): FedAvg's server, clients add mu/2 * ||w - w_global||^2 to their loss.

The proximal term bounds client drift on heterogeneous data; the server side is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedfleet.core.fit_config import FitConfig
from fedfleet.strategy.base import STRATEGIES
from fedfleet.strategy.fedavg import FedAvg


@STRATEGIES.register("fedprox")
@dataclass(frozen=True)
class FedProx(FedAvg):
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")

    def configure_fit(self, config: FitConfig) -> FitConfig:
        return dataclasses.replace(config, proximal_mu=self.mu)
