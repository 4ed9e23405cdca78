"""Params as flat buffers: one contiguous 1-D tensor per dtype, with a named spec.

Why: loading a global model, taking a delta, a weighted sum and a server optimizer step each become one
vectorised operation per dtype instead of a Python loop over dozens of tensors. A module "bound" with
:func:`bind_module` has its parameters rebound as views into the flat buffers, so writing the buffer *is*
loading the model, and training the model writes the buffer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfleet.errors import ConfigError

Selector = str | Callable[[str, nn.Parameter], bool] | None


@dataclass(frozen=True)
class TensorSpec:
    """One exchanged tensor: where it lives in its dtype's flat buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # element offset inside the flat buffer of this dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class ParamSpec:
    """The ordered, named layout of a set of params (names, shapes, dtypes, offsets)."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        sizes: dict[torch.dtype, int] = {}
        entries = []
        for name, shape, dtype in shapes:
            spec = TensorSpec(name, tuple(int(s) for s in shape), dtype, sizes.get(dtype, 0))
            sizes[dtype] = spec.offset + spec.numel
            entries.append(spec)
        if len({e.name for e in entries}) != len(entries):
            raise ValueError("param names must be unique")
        self.entries: tuple[TensorSpec, ...] = tuple(entries)
        self.sizes: dict[torch.dtype, int] = sizes
        self._by_name = {e.name: e for e in entries}

    @classmethod
    def of(cls, named: dict[str, Tensor] | list[tuple[str, Tensor]]) -> ParamSpec:
        items = named.items() if isinstance(named, dict) else named
        return cls([(n, tuple(t.shape), t.dtype) for n, t in items])

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def numel(self) -> int:
        return sum(self.sizes.values())

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty((), dtype=d).element_size() for d, n in self.sizes.items())

    @property
    def digest(self) -> str:
        """A short hash of names, shapes and dtypes: two parties agree on a layout by comparing it."""
        text = ";".join(f"{e.name}:{list(e.shape)}:{e.dtype}" for e in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __getitem__(self, name: str) -> TensorSpec:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamSpec) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        groups = ", ".join(f"{str(d).removeprefix('torch.')}: {n}" for d, n in self.sizes.items())
        return f"ParamSpec({len(self)} tensors; {groups})"


class FlatParams:
    """Named params stored as one flat buffer per dtype.

    Arithmetic helpers run once per dtype buffer (usually once). ``tensors()`` gives zero-copy named views.
    """

    __slots__ = ("buffers", "spec")

    def __init__(self, spec: ParamSpec, buffers: dict[torch.dtype, Tensor]) -> None:
        for dtype, n in spec.sizes.items():
            buf = buffers.get(dtype)
            if buf is None or buf.dim() != 1 or buf.numel() != n or buf.dtype != dtype:
                raise ValueError(f"flat buffer for {dtype} must be 1-D with {n} elements")
        self.spec = spec
        self.buffers = buffers

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def zeros(cls, spec: ParamSpec, device: torch.device | str = "cpu") -> FlatParams:
        return cls(spec, {d: torch.zeros(n, dtype=d, device=device) for d, n in spec.sizes.items()})

    @classmethod
    def from_tensors(cls, named: dict[str, Tensor], device: torch.device | str | None = None) -> FlatParams:
        spec = ParamSpec.of(named)
        dev = device if device is not None else next(iter(named.values())).device
        flat = cls.zeros(spec, dev)
        views = flat.tensors()
        with torch.no_grad():
            for name, t in named.items():
                views[name].copy_(t)
        return flat

    def zeros_like(self) -> FlatParams:
        return FlatParams(self.spec, {d: torch.zeros_like(b) for d, b in self.buffers.items()})

    def clone(self) -> FlatParams:
        return FlatParams(self.spec, {d: b.clone() for d, b in self.buffers.items()})

    def to(self, device: torch.device | str) -> FlatParams:
        return FlatParams(self.spec, {d: b.to(device) for d, b in self.buffers.items()})

    # -- views ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Named views into the flat buffers (no copy)."""
        return {e.name: self.buffers[e.dtype][e.offset : e.offset + e.numel].view(e.shape) for e in self.spec.entries}

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.buffers.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    @property
    def numel(self) -> int:
        return self.spec.numel

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    # -- vectorised arithmetic (in place, returns self) -----------------------------------------
    def copy_(self, other: FlatParams) -> FlatParams:
        self._check(other)
        for d, b in self.buffers.items():
            b.copy_(other.buffers[d])
        return self

    def zero_(self) -> FlatParams:
        for b in self.buffers.values():
            b.zero_()
        return self

    def add_(self, other: FlatParams, alpha: float = 1.0) -> FlatParams:
        self._check(other)
        for d, b in self.buffers.items():
            b.add_(other.buffers[d], alpha=alpha)
        return self

    def mul_(self, factor: float) -> FlatParams:
        for b in self.buffers.values():
            b.mul_(factor)
        return self

    def sub(self, other: FlatParams) -> FlatParams:
        self._check(other)
        return FlatParams(self.spec, {d: b - other.buffers[d] for d, b in self.buffers.items()})

    def sq_norm(self, block: int = 1 << 20) -> float:
        """The squared L2 norm, summed in float64 block by block: no model-sized temporary."""
        total = 0.0
        for buf in self.buffers.values():
            for i in range(0, buf.numel(), block):
                total += float(buf[i : i + block].double().square().sum())
        return total

    def max_abs(self, block: int = 1 << 20) -> float:
        """The largest magnitude of any value (NaN when there is a NaN), block by block: no model-sized temporary."""
        top = 0.0
        for buf in self.buffers.values():
            for i in range(0, buf.numel(), block):
                m = float(buf[i : i + block].abs().max()) if buf.numel() else 0.0
                if m != m:  # NaN
                    return m
                top = max(top, m)
        return top

    def isfinite(self) -> bool:
        return all(_all_finite(b) for b in self.buffers.values() if b.is_floating_point())

    def allclose(self, other: FlatParams, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        self._check(other)
        return all(torch.allclose(b, other.buffers[d], rtol=rtol, atol=atol) for d, b in self.buffers.items())

    def _check(self, other: FlatParams) -> None:
        if other.spec is not self.spec and other.spec != self.spec:
            raise ValueError(f"param layouts differ: {self.spec} vs {other.spec}")

    def __repr__(self) -> str:
        return f"FlatParams({self.spec!r}, device={self.device})"


def select_params(module: nn.Module, select: Selector = "all") -> list[tuple[str, nn.Parameter]]:
    """Which of a module's parameters are exchanged.

    ``"all"``; ``"trainable"`` (``requires_grad``, e.g. LoRA adapters); a regular expression matched
    against the parameter name (``"re:^classifier\\."``); or a callable ``(name, param) -> bool``.
    """
    named = list(module.named_parameters())
    if select is None or select == "all":
        chosen = named
    elif select == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif isinstance(select, str) and select.startswith("re:"):
        pattern = re.compile(select[3:])
        chosen = [(n, p) for n, p in named if pattern.search(n)]
    elif callable(select):
        chosen = [(n, p) for n, p in named if select(n, p)]
    else:
        raise ConfigError(f"params selection {select!r}: use 'all', 'trainable', 're:<regex>' or a callable")
    if not chosen:
        raise ConfigError(f"params selection {select!r} matches no parameter of {type(module).__name__}")
    return chosen


def bind_module(module: nn.Module, select: Selector = "all") -> FlatParams:
    """Move the selected parameters of ``module`` into flat buffers and make them views.

    Returns the FlatParams whose buffers now back the module: ``flat.copy_(global_params)`` loads a model
    in one copy per dtype, and the optimizer's in-place steps write the buffer.
    """
    chosen = select_params(module, select)
    device = chosen[0][1].device
    flat = FlatParams.zeros(ParamSpec.of([(n, p.data) for n, p in chosen]), device)
    views = flat.tensors()
    with torch.no_grad():
        for name, p in chosen:
            views[name].copy_(p.data)
            p.data = views[name]
    return flat


def bind_grads(module: nn.Module, flat: FlatParams) -> FlatParams:
    """Give the bound parameters ``.grad`` views into flat grad buffers (autograd accumulates in place).

    Clear them with ``grads.zero_()``; never ``zero_grad(set_to_none=True)``, which would drop the views.
    """
    grads = flat.zeros_like()
    views = grads.tensors()
    params = dict(module.named_parameters())
    for name in flat.spec.names:
        params[name].grad = views[name]
    return grads


def _all_finite(buf: torch.Tensor, block: int = 1 << 20) -> bool:
    """No NaN or inf in ``buf``, without a model-sized temporary.

    ``torch.isfinite(buf)`` materialises ``buf.abs()`` and two bool masks: 1.5x a float32 model of extra
    memory at the moment an update arrives (measured in benchmarks/streaming.py). A NaN or an inf always
    survives a sum, so one reduction answers almost every call; only a finite-valued sum that overflowed
    is checked again, block by block.
    """
    if bool(torch.isfinite(buf.sum())):
        return True
    return all(bool(torch.isfinite(buf[i : i + block]).all()) for i in range(0, buf.numel(), block))


def spec_difference(ours: ParamSpec, theirs: ParamSpec, limit: int = 3) -> str:
    """A short human description of how two layouts differ (for the refusal message)."""
    notes = [f"{len(theirs)} tensors vs {len(ours)}"] if len(theirs) != len(ours) else []
    for name in [n for n in theirs.names if n not in ours][:limit]:
        notes.append(f"unexpected {name}")
    for name in [n for n in ours.names if n not in theirs][:limit]:
        notes.append(f"missing {name}")
    for e in theirs.entries:
        if e.name in ours and (ours[e.name].shape, ours[e.name].dtype) != (e.shape, e.dtype):
            mine = ours[e.name]
            notes.append(
                f"{e.name} is {list(e.shape)} {_dtype(e.dtype)}, expected {list(mine.shape)} {_dtype(mine.dtype)}"
            )
            if len(notes) > 2 * limit:
                break
    return "; ".join(notes) or "same names and shapes, different order"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
