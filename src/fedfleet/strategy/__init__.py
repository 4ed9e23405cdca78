"""Server algorithms, one file each, registered by name in ``STRATEGIES``."""

from fedfleet.strategy.base import STRATEGIES, ServerState, Strategy, build_strategy
from fedfleet.strategy.fedadagrad import FedAdagrad
from fedfleet.strategy.fedadam import FedAdam
from fedfleet.strategy.fedavg import FedAvg
from fedfleet.strategy.fedavgm import FedAvgM
from fedfleet.strategy.fedopt import FedOpt
from fedfleet.strategy.fedprox import FedProx
from fedfleet.strategy.fedyogi import FedYogi
from fedfleet.strategy.qfedavg import QFedAvg

__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "QFedAvg",
    "ServerState",
    "Strategy",
    "build_strategy",
]
