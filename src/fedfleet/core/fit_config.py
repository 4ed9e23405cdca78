"""The per-round instruction a strategy gives each selected party's trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FitConfig:
    """How to train locally this round. Strategies adjust it (``dataclasses.replace``) in ``configure_fit``.

    ``steps`` (when set) overrides ``epochs``: exactly that many SGD steps, cycling over the local data.
    ``seed`` is derived from (job seed, round, client) by the round loop, so local shuffling is reproducible.
    """

    round: int = 0
    seed: int = 0
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - w_global||^2 to the local loss
    report_initial_loss: bool = False  # q-FedAvg needs the local loss at the global model
