"""Central differential privacy for FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018: user-level DP-FedAvg)
as a fold transform around the strategy's weighted mean.

    before the fold, per update:  delta <- delta * min(1, C / ||delta||)   (flat or per layer), weight <- 1
    after the fold:               mean  <- (sum of clipped deltas + N(0, (z C)^2 I)) / m

``m`` is the *expected* number of updates (the cohort): a fixed denominator, so one client's presence changes
the sum by at most C whatever the others do, and the noise std on the mean is z C / m. The strategy's server
step (FedAvg's lr, FedAdam, FedYogi, ...) then runs on that noisy mean: post-processing, no privacy cost.
With ``adaptive`` the clip norm follows a quantile of the norms (``adaptive.py``) and the noise is split between
the update and the count of unclipped updates so that the whole round is still one Gaussian of multiplier z.

The "was it clipped" bit travels with each update as a metric (its weight is 1), so Ray workers' partial folds
carry it to the top; it is taken out before the round's metrics are shown. The arbiter is trusted with each
clipped update here (that is what *central* means); ``where: distributed`` moves the noise to the parties,
under secure aggregation.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate, Update
from fedfleet.errors import ConfigError
from fedfleet.privacy.accountant import Accountant
from fedfleet.privacy.adaptive import AdaptiveClip, AdaptiveClipConfig, update_multiplier
from fedfleet.privacy.budget import Budget
from fedfleet.privacy.clipping import CLIPPERS
from fedfleet.privacy.noise import NoiseSource, add_gaussian_, noise_key, normals

UNCLIPPED = "__dp_unclipped"  # the per-update bit, averaged by the weighted mean (weights are all 1)


class CentralGaussian:
    """``clip`` C (the initial one with ``adaptive``), ``noise_multiplier`` z, ``expected_count`` m; ``noise``:
    secure | seeded; ``sampling_rate`` q for the accountant; ``budget``: the epsilon a round may not pass."""

    mergeable: ClassVar[bool] = True  # per update, and the bit travels in the metrics
    memory: ClassVar[str] = "O(model), one update at a time"

    def __init__(
        self,
        noise_multiplier: float,
        expected_count: float,
        clip: float = 1.0,
        per_layer: bool = False,
        adaptive: AdaptiveClipConfig | dict | None = None,
        noise: NoiseSource | str = NoiseSource.SECURE,
        seed: int = 0,
        sampling_rate: float = 1.0,
        accountant: Accountant | None = None,
        budget: Budget | None = None,
    ) -> None:
        if not (noise_multiplier >= 0 and expected_count > 0 and clip > 0):
            raise ConfigError(
                f"dp: noise_multiplier must be >= 0, expected_count and clip > 0 (got {noise_multiplier}, "
                f"{expected_count}, {clip})"
            )
        self.z, self.m, self.per_layer = float(noise_multiplier), float(expected_count), bool(per_layer)
        self.noise, self.seed, self.q = NoiseSource(noise), int(seed), float(sampling_rate)
        config = AdaptiveClipConfig(**adaptive) if isinstance(adaptive, dict) else adaptive
        self.adaptive = AdaptiveClip(config, clip, self.m) if config is not None else None
        self.clip = float(clip)
        self.z_update = self.z if self.adaptive is None else update_multiplier(self.z, self.adaptive.count_std)
        self.accountant = accountant
        self.budget = budget
        self.rounds = 0  # noised aggregates released: the seeded noise's round
        self._metrics: dict[str, float] = {}

    # -- the pipeline's hooks ------------------------------------------------------------------------
    def start_round(self, global_params: FlatParams, inner: Any) -> None:
        if not getattr(inner, "weighted_mean", False):
            raise ConfigError(
                f"central DP noises a weighted mean of clipped deltas, but this strategy aggregates with "
                f"{type(inner).__name__} (use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad)"
            )
        if self.budget is not None and self.accountant is not None:
            self.budget.check_next(self.accountant, self.q, self.z)

    def before_fold(self, update: Update) -> Update:
        if not update.is_delta:
            raise ValueError("DP clips a delta; this update carries the params themselves (is_delta=False)")
        norm = CLIPPERS[self.per_layer](update.params, self.clip)
        update.metrics = {**update.metrics, UNCLIPPED: 1.0 if norm <= self.clip else 0.0}
        update.weight = 1.0
        return update

    def after_fold(self, aggregate: Aggregate) -> Aggregate:
        unclipped = aggregate.metrics.pop(UNCLIPPED, 0.0) * aggregate.count
        total = aggregate.params.mul_(aggregate.weight)  # the weighted mean back to the sum (weights are 1)
        std = self.z_update * self.clip
        add_gaussian_(total, std, noise_key(self.noise, self.seed, self.rounds, "update"))
        aggregate.params = total.mul_(1.0 / self.m)
        aggregate.weight = self.m
        self._metrics = {
            "dp_clip": self.clip,
            "dp_noise_multiplier": self.z,
            "dp_noise_std": std / self.m,  # on the mean the server step gets
        }
        if self.adaptive is not None:
            count_noise = normals(noise_key(self.noise, self.seed, self.rounds, "count"), 1)[0]
            fraction = self.adaptive.step(unclipped + self.adaptive.count_std * count_noise)
            self.clip = self.adaptive.clip
            self._metrics["dp_unclipped_fraction"] = fraction  # the noisy estimate: the exact one is not private
        self.rounds += 1
        if self.accountant is not None:
            self.accountant.compose(self.q, self.z)
            self._metrics.update(self.accountant_metrics())
        return aggregate

    def accountant_metrics(self) -> dict[str, float]:
        metrics = {"dp_epsilon": self.accountant.epsilon(), "dp_delta": self.accountant.delta}
        if self.budget is not None:
            metrics["dp_epsilon_budget"] = self.budget.epsilon
        return metrics

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rounds": self.rounds, "clip": self.clip}
        if self.accountant is not None:
            state["accountant"] = self.accountant.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("rounds", 0))
        self.clip = float(state.get("clip", self.clip))
        if self.adaptive is not None:
            self.adaptive.clip = self.clip
        if self.accountant is not None and "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])
