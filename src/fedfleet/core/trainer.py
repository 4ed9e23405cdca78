"""The client-side contract: anything that can train and evaluate given params."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update


@runtime_checkable
class Trainer(Protocol):
    """``fit`` trains from ``params`` and returns an :class:`Update`; ``evaluate`` returns metrics.

    ``data`` is the party's local data. A deployed party's trainer owns its data and gets ``None``; in
    simulation one trainer serves every virtual client and the runtime passes each client's slice.
    """

    def fit(self, params: FlatParams, config: FitConfig, data: Any = None) -> Update: ...

    def evaluate(self, params: FlatParams, data: Any = None) -> dict[str, float]: ...
