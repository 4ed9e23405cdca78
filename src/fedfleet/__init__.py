"""fedfleet: federated learning of deep models.

The names most programs need are here; everything else lives in its layer (see the README's layout).
"""

__version__ = "0.1.0"

from fedfleet.client import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
from fedfleet.core.params import FlatParams, ParamSpec, bind_module
from fedfleet.core.update import Update
from fedfleet.simulation import Simulation
from fedfleet.strategy import STRATEGIES, build_strategy

__all__ = [
    "STRATEGIES",
    "Callback",
    "FitConfig",
    "FlatParams",
    "LoopConfig",
    "ParamSpec",
    "RoundLoop",
    "RoundRecord",
    "Simulation",
    "TorchTrainer",
    "Update",
    "__version__",
    "bind_module",
    "build_strategy",
]
