"""When a simulated synchronous round ends, and whose updates count: round-end policies, by name.

Every policy sees, for each selected client, its latency (seconds to download, train and upload) and how
long it stays online from the round's start; a client whose latency exceeds its time online drops out
when it goes offline. The policy says which finished clients' updates are folded and when the server
closes the round. All of this is known before training, so the runtime only trains the clients that count.

    all        wait for every selected client (or its disconnection)
    deadline   close the round after ``seconds``; later clients are stragglers, their work is lost
    overcommit select K x (1 + factor) and keep the first K to finish (FedScale's over-commitment)

The server-side view that selectors learn from (loss, samples, duration per selected client) is a
:class:`RoundFeedback`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedfleet.registry import Registry, construct


@dataclass(frozen=True)
class RoundOutcome:
    keep: np.ndarray  # (c,) bool: the client finishes in time and its update is folded
    offline: np.ndarray  # (c,) bool: the client went offline before it finished
    duration: float  # simulated seconds from the round's start until the server closes it

    @property
    def late(self) -> np.ndarray:
        """Clients that would have finished but too late (deadline) or after the first K (over-commitment)."""
        return ~self.keep & ~self.offline


class RoundEnd(Protocol):
    def cohort_size(self, k: int) -> int:
        """How many clients to select so that ``k`` updates are folded."""
        ...

    def decide(self, k: int, latency: np.ndarray, online_for: np.ndarray) -> RoundOutcome: ...


def _heard_at(latency: np.ndarray, online_for: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each client finishes, and when the server hears from it (its update or its disconnection)."""
    finishes = latency <= online_for
    return finishes, np.where(finishes, latency, online_for)


def _last(times: np.ndarray) -> float:
    return float(times.max()) if len(times) else 0.0


ROUND_END: Registry[type] = Registry("round-end policy")


@ROUND_END.register("all")
@dataclass(frozen=True)
class WaitForAll:
    def cohort_size(self, k: int) -> int:
        return k

    def decide(self, k: int, latency: np.ndarray, online_for: np.ndarray) -> RoundOutcome:
        finishes, heard = _heard_at(latency, online_for)
        return RoundOutcome(finishes, ~finishes, _last(heard))


@ROUND_END.register("deadline")
@dataclass(frozen=True)
class Deadline:
    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")

    def cohort_size(self, k: int) -> int:
        return k

    def decide(self, k: int, latency: np.ndarray, online_for: np.ndarray) -> RoundOutcome:
        finishes, heard = _heard_at(latency, online_for)
        keep = finishes & (latency <= self.seconds)
        # a client that drops after the deadline was a straggler first: the server had closed the round
        offline = ~finishes & (online_for <= self.seconds)
        return RoundOutcome(keep, offline, min(self.seconds, _last(heard)))


@ROUND_END.register("overcommit")
@dataclass(frozen=True)
class OverCommit:
    """Select ``floor(K * (1 + factor))``; the round ends when the K-th update arrives (or ``deadline``)."""

    factor: float = 0.3
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.factor >= 0:
            raise ValueError(f"factor must be >= 0, got {self.factor}")
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {self.deadline}")

    def cohort_size(self, k: int) -> int:
        return math.floor(k * (1.0 + self.factor) + 1e-9)  # 1e-9: 100 * 1.3 is 130.00000000000003 or 129.99...

    def decide(self, k: int, latency: np.ndarray, online_for: np.ndarray) -> RoundOutcome:
        finishes, heard = _heard_at(latency, online_for)
        limit = math.inf if self.deadline is None else self.deadline
        in_time = finishes & (latency <= limit)
        order = np.flatnonzero(in_time)[np.argsort(latency[in_time], kind="stable")]
        keep = np.zeros(len(latency), dtype=bool)
        keep[order[:k]] = True
        # FedScale: the round ends with the K-th completion; with fewer than K in time the server waits for all
        duration = float(latency[order[k - 1]]) if 0 < k <= len(order) else min(limit, _last(heard))
        offline = ~finishes & (online_for <= duration)
        return RoundOutcome(keep, offline, duration)


def build_round_end(name: str, **params: object) -> RoundEnd:
    return construct(ROUND_END.get(name), params, f"system.round_end {name!r}")


@dataclass(frozen=True)
class RoundFeedback:
    """What the server learned about each client it selected in a round: only what a real server knows.

    ``duration`` is the seconds from the round's start until the client's update arrived; for a client
    that did not deliver it is the time the server waited for it (a lower bound on its latency).
    ``loss`` is the mean training loss the client reported (NaN if it delivered nothing); when the trainer
    reports ``train_loss_sq`` (mean squared per-sample loss) ``loss`` is its square root, as Oort wants.
    """

    clients: np.ndarray  # (c,) int64
    completed: np.ndarray  # (c,) bool: the update arrived and was folded
    loss: np.ndarray  # (c,) float64
    samples: np.ndarray  # (c,) float64 samples trained (0 if not completed)
    duration: np.ndarray  # (c,) float64 seconds
