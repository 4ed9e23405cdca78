"""The model zoo and its registry."""

from fedfleet.models.zoo import MODELS, build_model, logistic_regression, mlp, simple_cnn

__all__ = ["MODELS", "build_model", "logistic_regression", "mlp", "simple_cnn"]
