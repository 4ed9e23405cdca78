"""fedfleet: federated learning of deep models."""

__version__ = "0.1.0"
