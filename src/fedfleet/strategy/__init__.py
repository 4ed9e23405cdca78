"""Server algorithms, one file each, registered by name in ``STRATEGIES``."""

from fedfleet.strategy import fedavg  # noqa: F401  (registers)
from fedfleet.strategy.base import STRATEGIES, ServerState, Strategy, build_strategy
from fedfleet.strategy.fedavg import FedAvg

__all__ = ["STRATEGIES", "FedAvg", "ServerState", "Strategy", "build_strategy"]
