"""q-FedAvg (Li, Sanjabi, Beirami and Smith, ICLR 2020, "Fair Resource Allocation in Federated Learning").

Clients with a higher loss at the global model get more say, for fairer accuracy across clients. With
F_k the client's loss at the global model w (trainers report it as ``stats.initial_loss`` when asked), delta_k
the client's delta (w_k - w) and L an estimate of the local Lipschitz constant (about 1 / client lr):
    Δw_k = L * (w - w_k) = -L * delta_k
    Δ_k  = F_k^q * Δw_k
    h_k  = q * F_k^(q-1) * ||Δw_k||^2 + L * F_k^q
    w   <- w - sum_k Δ_k / sum_k h_k
The example weights are not used (as in the paper). q = 0 gives the unweighted mean of the deltas.
A client with F_k = 0 contributes nothing to the sum and only L * 0^q to h (its q * F^(q-1) term is
taken as 0, where for q < 1 it would be infinite).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedfleet.core.aggregate import Aggregator, MetricMean, shown
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update
from fedfleet.strategy.base import STRATEGIES, ServerState, Strategy


class QFedAvgAggregator:
    """Running sum of Δ_k and the scalar sum of h_k: O(model) memory for any number of clients."""

    def __init__(self, like: FlatParams, q: float, lipschitz: float) -> None:
        self.q, self.lipschitz = q, lipschitz
        self._sum = like.zeros_like()
        self._h = 0.0
        self._count = 0
        self._metrics = MetricMean()

    def add(self, update: Update) -> None:
        if update.stats.initial_loss is None:
            raise ValueError("q-FedAvg needs each client's initial_loss (stats: the loss at the global model)")
        loss = float(update.stats.initial_loss)
        if loss < 0:
            raise ValueError(f"q-FedAvg needs a non-negative loss, got {loss}")
        q, lip = self.q, self.lipschitz
        f_q = loss**q
        self._sum.add_(update.params, alpha=-lip * f_q)  # Δ_k = F^q * (-L * delta_k)
        grad_sq = lip * lip * update.params.sq_norm()  # ||Δw_k||^2
        self._h += (q * loss ** (q - 1) * grad_sq if loss > 0 else 0.0) + lip * f_q
        self._count += 1
        self._metrics.add(shown(update), 1.0)

    def merge(self, other: Aggregator) -> None:
        if not isinstance(other, QFedAvgAggregator) or (other.q, other.lipschitz) != (self.q, self.lipschitz):
            raise TypeError(f"cannot merge a {type(other).__name__} into a q-FedAvg aggregator of other settings")
        self._sum.add_(other._sum)
        self._h += other._h
        self._count += other._count
        self._metrics.merge(other._metrics)

    def finish(self) -> Aggregate:
        if self._count == 0 or self._h <= 0:
            raise ValueError("q-FedAvg: nothing to aggregate (no update, or every loss is 0 with q > 0)")
        return Aggregate(self._sum, float(self._count), self._count, self._metrics.means(), {"h": self._h})


@STRATEGIES.register("qfedavg")
@dataclass(frozen=True)
class QFedAvg(Strategy):
    q: float = 1.0
    lipschitz: float = 10.0

    def __post_init__(self) -> None:
        if self.q < 0:
            raise ValueError(f"q must be >= 0, got {self.q}")
        if self.lipschitz <= 0:
            raise ValueError(f"lipschitz must be > 0, got {self.lipschitz} (about 1 / client lr)")

    def configure_fit(self, config: FitConfig) -> FitConfig:
        return dataclasses.replace(config, report_initial_loss=True)

    def aggregator(self, global_params: FlatParams) -> Aggregator:
        return QFedAvgAggregator(global_params, self.q, self.lipschitz)

    def server_step(self, global_params: FlatParams, aggregate: Aggregate, state: ServerState) -> None:
        global_params.add_(aggregate.params, alpha=-1.0 / aggregate.extra["h"])
