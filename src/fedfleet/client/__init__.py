"""Client-side trainers."""

from fedfleet.client.torch_trainer import OPTIMIZERS, TorchTrainer

__all__ = ["OPTIMIZERS", "TorchTrainer"]
