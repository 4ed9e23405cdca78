"""The trainer's optimizers for a whole cohort at once: one update over stacked weights ``(C, *shape)``.

Each optimizer of ``TorchTrainer`` (``client.torch_trainer.OPTIMIZERS``) is elementwise, so row ``c`` of a stacked
update is exactly client ``c``'s own update. The formulas and defaults are torch's (``torch.optim``: Adam's
betas (0.9, 0.999) and eps 1e-8, Adagrad's eps 1e-10, RMSprop's alpha 0.99), with the trainer's ``weight_decay``
and ``momentum``; SGD is the trainer's flat step (weight decay, then momentum), the same maths as torch's SGD.

A step takes a run of rows only: the cohort is ordered by its clients' number of batches, so a client whose data
has run out (a ragged cohort) sits past the run and its weights and state stay as its last step left them.
FedProx's proximal gradient ``mu * (w - w_global)`` is added to the gradient before the step, as the trainer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

STATE: dict[str, tuple[str, ...]] = {  # per-weight state tensors, zero at the start of a fit
    "sgd": ("momentum",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "adagrad": ("sum",),
    "rmsprop": ("square_avg", "momentum"),
}


@dataclass
class CohortOptimizer:
    """One fit's optimizer over stacked weights; ``step(a, grads)`` updates rows ``[:a]`` in place."""

    name: str
    weights: Sequence[Tensor]  # (C, *shape) each, updated in place
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    anchors: Sequence[Tensor] = ()  # the global weights (1, *shape), for FedProx
    steps: int = 0
    state: list[dict[str, Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in STEPS:
            raise ValueError(f"no cohort optimizer {self.name!r}; known: {', '.join(STEPS)}")
        needs = [s for s in STATE[self.name] if s != "momentum" or self.momentum]
        self.state = [{s: torch.zeros_like(w) for s in needs} for w in self.weights]

    @torch.no_grad()
    def step(self, rows: slice, grads: Sequence[Tensor | None], count: int) -> None:
        """Rows ``rows`` take their ``count``-th step. ``grads[k]`` None: weight k does not move (its step was
        fused into the backward pass, or it is frozen and nothing but its gradient would move it)."""
        self.steps = count  # clients past the prefix never step again, so every stepping row shares this count
        rule = STEPS[self.name]
        for k, (w, g) in enumerate(zip(self.weights, grads, strict=True)):
            if g is None:
                continue
            w = w[rows]
            if self.proximal_mu:
                g = g.add(w - self.anchors[k], alpha=self.proximal_mu)
            rule(self, w, g, {s: t[rows] for s, t in self.state[k].items()})


def _l2(opt: CohortOptimizer, w: Tensor, g: Tensor) -> Tensor:
    return g.add(w, alpha=opt.weight_decay) if opt.weight_decay else g


def _sgd(opt: CohortOptimizer, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
    g = _l2(opt, w, g)
    if opt.momentum:
        g = state["momentum"].mul_(opt.momentum).add_(g)
    w.add_(g, alpha=-opt.lr)


def _adam(opt: CohortOptimizer, w: Tensor, g: Tensor, state: dict[str, Tensor], decoupled: bool = False) -> None:
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    if decoupled:
        w.mul_(1 - opt.lr * opt.weight_decay)
    else:
        g = _l2(opt, w, g)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = opt.lr / (1 - beta1**opt.steps)
    denom = (v.sqrt() / math.sqrt(1 - beta2**opt.steps)).add_(eps)
    w.addcdiv_(m, denom, value=-step_size)


def _adamw(opt: CohortOptimizer, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
    _adam(opt, w, g, state, decoupled=True)


def _adagrad(opt: CohortOptimizer, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
    g = _l2(opt, w, g)
    total = state["sum"].addcmul_(g, g, value=1)
    w.addcdiv_(g, total.sqrt().add_(1e-10), value=-opt.lr)


def _rmsprop(opt: CohortOptimizer, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
    alpha, eps = 0.99, 1e-8
    g = _l2(opt, w, g)
    avg = state["square_avg"].mul_(alpha).addcmul_(g, g, value=1 - alpha).sqrt().add_(eps)
    if opt.momentum:
        w.add_(state["momentum"].mul_(opt.momentum).addcdiv_(g, avg), alpha=-opt.lr)
    else:
        w.addcdiv_(g, avg, value=-opt.lr)


STEPS: dict[str, Callable[..., None]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
}
