"""The optional server-optimiser step of a merge, applied tensor by tensor to the mean delta from a base.

With a base checkpoint w (the previous round's model) and the parties' weighted mean m, the merge hands each
tensor's delta d = m - w to a server optimiser, which moves w in place and updates its own state for that tensor
(momentum, Adam moments). FedAvg, FedAvgM, FedAdam, FedYogi and FedAdagrad are fedfleet's strategies
(``fedfleet.strategy``), whose server steps are elementwise: each runs here on a one-tensor ``FlatParams``, so
the maths is theirs, byte for byte, and only one tensor and its state are in memory at a time. ``adamw`` (see
``adamw.py``) needs the norm of the whole delta first, which the merge computes in a pass of its own.

The state lives beside the merged weights, one file per key (``fedfleet-server-opt.<key>.safetensors``: fp32,
the weights' names; the optimiser's name, its settings and the step count in the header), so the next merge,
whose base is this output, continues it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.update import Aggregate
from fedfleet.errors import ConfigError
from fedfleet.hpc.merge.errors import MergeError
from fedfleet.registry import Registry, construct
from fedfleet.strategy.base import STRATEGIES, Strategy

STATE_PREFIX = "fedfleet-server-opt"


def state_file(key: str) -> str:
    """The file of one state key: ``fedfleet-server-opt.exp_avg.safetensors``."""
    return f"{STATE_PREFIX}.{key}.safetensors"


@dataclass(frozen=True)
class StepInfo:
    """What a step knows besides its tensor: the step number (1 for the first merge with this state) and the
    factor that clips the whole delta's norm (1.0 when nothing is clipped)."""

    step: int
    clip: float = 1.0


class ServerOpt:
    name: ClassVar[str] = "server optimiser"
    needs_norm: ClassVar[bool] = False  # the step uses the norm of the whole mean delta (a pass of its own)

    def state_keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def init(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh fp32 state for a tensor shaped like ``w``."""
        raise NotImplementedError

    def step(self, w: torch.Tensor, delta: torch.Tensor, state: dict[str, torch.Tensor], info: StepInfo) -> None:
        """Move ``w`` (fp32) in place by the mean delta; update ``state`` in place. ``delta`` may be overwritten."""
        raise NotImplementedError

    def clip_factor(self, norm: float) -> float:
        """The factor the whole mean delta is scaled by, from its norm (asked only when ``needs_norm``)."""
        return 1.0

    def settings(self) -> dict[str, float]:
        return {}

    def describe(self) -> str:
        return json.dumps({"name": self.name, **self.settings()}, sort_keys=True)


class StrategyOpt(ServerOpt):
    """A fedfleet strategy's own server step, run on one tensor at a time."""

    def __init__(self, name: str, strategy: Strategy) -> None:
        self.name = name  # type: ignore[misc]
        self.strategy = strategy
        self._keys = tuple(strategy.init_state(_flat("probe", torch.zeros(1))))

    def state_keys(self) -> tuple[str, ...]:
        return self._keys

    def init(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.strategy.init_state(_flat("w", w))
        return {k: state[k].buffers[torch.float32].view(w.shape) for k in self._keys}

    def step(self, w: torch.Tensor, delta: torch.Tensor, state: dict[str, torch.Tensor], info: StepInfo) -> None:
        flat_state = {k: _flat("w", v) for k, v in state.items()}
        self.strategy.server_step(_flat("w", w), Aggregate(params=_flat("w", delta), weight=1.0, count=1), flat_state)

    def settings(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self.strategy).items()}  # type: ignore[call-overload]


def _flat(name: str, t: torch.Tensor) -> FlatParams:
    """A zero-copy one-tensor FlatParams over ``t`` (fp32, contiguous): the strategy writes ``t`` itself."""
    return FlatParams(ParamSpec([(name, tuple(t.shape), t.dtype)]), {t.dtype: t.view(-1)})


SERVER_OPTS: Registry[type] = Registry("server optimiser")
ELEMENTWISE = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")  # strategies whose step is per element


def build_server_opt(name: str, params: dict[str, float] | None = None) -> ServerOpt:
    """``name`` with its settings (a bad key or value is an error naming it)."""
    import fedfleet.hpc.merge.adamw  # noqa: F401 -- registers adamw

    params = dict(params or {})
    key = name.lower()
    if key in ELEMENTWISE:
        strategy = construct(STRATEGIES.get(key), params, f"server optimiser {key!r}")
        return StrategyOpt(key, strategy)
    if key in SERVER_OPTS:
        return construct(SERVER_OPTS.get(key), params, f"server optimiser {key!r}")
    known = sorted([*ELEMENTWISE, *SERVER_OPTS.names()])
    raise ConfigError(f"unknown server optimiser {name!r}; known: {', '.join(known)}")


def server_opt_names() -> list[str]:
    import fedfleet.hpc.merge.adamw  # noqa: F401

    return sorted([*ELEMENTWISE, *SERVER_OPTS.names()])


def state_metadata(opt: ServerOpt, step: int) -> dict[str, str]:
    return {"fedfleet_server_opt": opt.name, "settings": opt.describe(), "step": str(step)}


def check_state_header(opt: ServerOpt, metadata: dict[str, str], where: str) -> int:
    """The step count a stored state has reached; an error if it belongs to another optimiser."""
    stored = metadata.get("fedfleet_server_opt")
    if stored != opt.name:
        raise MergeError(
            f"{where}: this server-optimiser state is for {stored!r}, not {opt.name!r}; merge with "
            f"--server-opt {stored} to continue it, or pass --reset-state to start a fresh one"
        )
    try:
        return int(metadata["step"])
    except (KeyError, ValueError):
        raise MergeError(f"{where}: the state's header has no step count") from None
