"""AdamW on the pseudo-gradient, with its norm clipped over the whole model, as xFFL's LLM example trains.

The pseudo-gradient is g = -delta (the base minus the parties' mean: the direction a step of gradient descent
would take the base). Its norm over every tensor is clipped to ``max_norm`` the way
``torch.nn.utils.clip_grad_norm_`` does (g *= min(1, max_norm / (norm + 1e-6))), which is why the merge needs
the whole delta's norm before the first step: clipping tensor by tensor would change the direction of the
update (xFFL warns of the same when its optimiser runs parameter by parameter). Then, per tensor, exactly
``torch.optim.AdamW``'s update (decoupled weight decay, bias-corrected moments):

    w <- w * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g^2
    w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from fedfleet.hpc.merge.server_opt import SERVER_OPTS, ServerOpt, StepInfo


@SERVER_OPTS.register("adamw")
@dataclass(frozen=True)
class AdamWClip(ServerOpt):
    name: ClassVar[str] = "adamw"
    needs_norm: ClassVar[bool] = True

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_norm: float = 1.0  # inf: no clipping

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.max_norm > 0:
            raise ValueError(f"max_norm must be > 0 (inf for no clipping), got {self.max_norm}")

    def clip_factor(self, norm: float) -> float:
        return min(1.0, self.max_norm / (norm + 1e-6))

    def state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def init(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}

    def step(self, w: torch.Tensor, delta: torch.Tensor, state: dict[str, torch.Tensor], info: StepInfo) -> None:
        grad = delta.mul_(-info.clip)  # the pseudo-gradient, clipped; delta is not needed again
        m, v = state["exp_avg"], state["exp_avg_sq"]
        w.mul_(1 - self.lr * self.weight_decay)
        m.lerp_(grad, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1 = 1 - self.beta1**info.step
        bias2 = 1 - self.beta2**info.step
        denom = grad.copy_(v).sqrt_().div_(math.sqrt(bias2)).add_(self.eps)  # reuses grad's memory
        w.addcdiv_(m, denom, value=-self.lr / bias1)

    def settings(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}
