"""fedfleet: federated learning of deep models.

The names most programs need are here; everything else lives in its layer (docs/architecture.md). They are
imported on first use, so ``fedfleet --help``, ``fedfleet certs`` and ``import fedfleet.errors`` do not pay
for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedfleet.lazy import lazy_names

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "TorchTrainer": "fedfleet.client",
    "FitConfig": "fedfleet.core.fit_config",
    "Callback": "fedfleet.core.loop",
    "LoopConfig": "fedfleet.core.loop",
    "RoundLoop": "fedfleet.core.loop",
    "RoundRecord": "fedfleet.core.loop",
    "FlatParams": "fedfleet.core.params",
    "ParamSpec": "fedfleet.core.params",
    "bind_module": "fedfleet.core.params",
    "Update": "fedfleet.core.update",
    "Simulation": "fedfleet.jobs.simulation",
    "STRATEGIES": "fedfleet.strategy",
    "build_strategy": "fedfleet.strategy",
}

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

if TYPE_CHECKING:
    from fedfleet.client import TorchTrainer
    from fedfleet.core.fit_config import FitConfig
    from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
    from fedfleet.core.params import FlatParams, ParamSpec, bind_module
    from fedfleet.core.update import Update
    from fedfleet.jobs.simulation import Simulation
    from fedfleet.strategy import STRATEGIES, build_strategy


__getattr__ = lazy_names("fedfleet", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
