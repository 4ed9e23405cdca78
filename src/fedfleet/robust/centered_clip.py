"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021): starting from the previous round's aggregate v,
repeat ``iters`` times v <- v + (1/n) sum_k (x_k - v) min(1, tau / ||x_k - v||). The next round starts from
this round's result, the server-side counterpart of the paper's momentum (the first round from zero).

Why it holds (tests/robust/test_bounds.py): if the honest updates are within tau of every iterate (so they
are not clipped), one iteration moves v to the honest mean's side except for the attackers' clipped pulls,
at most tau each: after L iterations ||v - mean_h|| <= (f/n)^L ||v_0 - mean_h|| + tau (f/n) / (1 - f/n).

The centre is state: it travels in the checkpoint (``state_dict``), so a resumed run equals an uninterrupted
one. Weights are ignored (the paper's plain mean of clipped differences). Cost: two passes per iteration,
one model-sized centre kept between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedfleet.robust.base import RobustCombiner, check_count, check_positive, zeros
from fedfleet.robust.stack import UpdateStack


@dataclass(kw_only=True, eq=False)
class CenteredClip(RobustCombiner):
    """Clip each update to radius tau around the previous aggregate, average, repeat; weights ignored."""

    name: ClassVar[str] = "centered_clip"
    memory: ClassVar[str] = RobustCombiner.memory + ", and the centre between rounds"
    tau: float = 1.0  # clipping radius around the centre (the L2 norm of a delta)
    iters: int = 3  # clipping iterations per round (the paper finds 1 enough with momentum)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("tau", self.tau)
        check_count("iters", self.iters, minimum=1)
        self._center: Tensor | None = None

    def needs(self, n: int) -> str | None:
        return "centered_clip needs at least 1 update per round" if n < 1 else None

    def combine(self, stack: UpdateStack) -> tuple[Tensor, dict[str, float]]:
        v = self._center.to(stack.device, stack.dtype) if self._center is not None else zeros(stack)
        if v.numel() != stack.dim:
            raise ValueError(f"centered_clip's centre has {v.numel()} values, the model {stack.dim}")
        clipped = 0.0
        for i in range(self.iters):
            d = stack.distances_to(v)
            scale = (self.tau / d.clamp_min(1e-30)).clamp_max(1.0)
            if i == 0:
                clipped = float((d > self.tau).sum())
            c = scale / stack.k
            # v + mean_k (x_k - v) scale_k = v (1 - sum_k c_k) + sum_k c_k x_k
            v = v * (1.0 - float(c.sum())) + stack.combine(c)
        return v, {"clipped": clipped}

    def remember(self, result: Tensor) -> None:
        self._center = result.clone()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._center is None else {"center": self._center.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        center = state.get("center")
        self._center = None if center is None else torch.as_tensor(center).clone()
