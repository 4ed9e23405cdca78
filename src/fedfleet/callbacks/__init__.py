"""Side effects of the round loop, one small callback each."""

from fedfleet.callbacks.checkpoint import CheckpointCallback, resume
from fedfleet.callbacks.early_stopping import EarlyStopping
from fedfleet.callbacks.metrics_file import MetricsFileCallback
from fedfleet.callbacks.progress import OneOf, ProgressCallback
from fedfleet.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "CheckpointCallback",
    "EarlyStopping",
    "MetricsFileCallback",
    "OneOf",
    "ProgressCallback",
    "TensorBoardCallback",
    "resume",
]
