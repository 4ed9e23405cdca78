"""The model zoo and its registry."""

from fedfleet.models.dlrm import DLRM  # also registers "dlrm"
from fedfleet.models.zoo import MODELS, build_model, logistic_regression, mlp, simple_cnn

__all__ = ["DLRM", "MODELS", "build_model", "logistic_regression", "mlp", "simple_cnn"]
