"""What one sync did, as a record the callback keeps and as the metrics it logs."""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "fed/"  # every federated metric is logged under this prefix, next to the module's own


@dataclass(frozen=True)
class SyncRecord:
    sync: int  # 1, 2, ...: how many syncs this party has made
    step: int  # the optimizer step (trainer.global_step) the sync happened at
    weight: float  # examples trained on since the previous sync, summed over the party's ranks
    round_train_loss: float  # mean training loss per example over those examples (nan: none reported)
    bytes_exchanged: int  # params payload sent + received by this party so far (framing excluded)
    sync_seconds: float  # this sync, waiting for the other parties included
    samples_per_sec: float  # training throughput since the previous sync, the sync itself excluded

    def metrics(self) -> dict[str, float]:
        return {
            f"{PREFIX}sync": float(self.sync),
            f"{PREFIX}round_examples": self.weight,
            f"{PREFIX}round_train_loss": self.round_train_loss,
            f"{PREFIX}bytes_exchanged": float(self.bytes_exchanged),
            f"{PREFIX}sync_seconds": self.sync_seconds,
            f"{PREFIX}samples_per_sec": self.samples_per_sec,
        }
