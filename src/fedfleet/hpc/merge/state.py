"""The server optimiser's state on disk, read and written block by block like the weights beside it.

One safetensors file per state key (``fedfleet-server-opt.exp_avg.safetensors``, ...), each holding that key's
fp32 tensor for every weight under the weight's own name, and in its header the optimiser's name, settings and
step count. One file per key lets every key be written in the merge's order, row block after row block.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fedfleet.hpc.merge.checkpoint import Checkpoint
from fedfleet.hpc.merge.errors import MergeError
from fedfleet.hpc.merge.server_opt import STATE_PREFIX, ServerOpt, check_state_header, state_file, state_metadata
from fedfleet.hpc.merge.writer import ShardWriter

Rows = tuple[int, int] | None


class StateIn:
    """The state a base checkpoint carries beside its weights, or fresh state."""

    def __init__(self, opt: ServerOpt, base: Path, layout: dict[str, tuple[int, ...]], reset: bool) -> None:
        self.opt = opt
        self.stored: dict[str, Checkpoint] = {}
        self.step = 0  # steps taken before this merge
        files = {key: base / state_file(key) for key in opt.state_keys()}
        present = sorted(base.glob(f"{STATE_PREFIX}.*.safetensors"))
        if reset or not files or not present:
            return
        steps = {check_state_header(opt, _metadata(present[0]), str(present[0]))}  # another optimiser's: refused
        for key, file in files.items():
            if not file.is_file():
                raise MergeError(f"{file} is missing, though {base} holds the rest of a server-optimiser state")
            steps.add(check_state_header(opt, _metadata(file), str(file)))
            self.stored[key] = stored = Checkpoint(file)
            for name, shape in layout.items():  # all of it checked before the merge writes anything
                info = stored.tensors.get(name)
                if info is None or info.shape != shape or info.dtype != torch.float32:
                    raise MergeError(
                        f"{file}: no fp32 {key} state shaped {list(shape)} for tensor {name!r}; this state is not "
                        "the base model's (pass --reset-state to start a fresh one)"
                    )
        if len(steps) != 1:
            raise MergeError(f"{base}: the server-optimiser state files are at different steps ({sorted(steps)})")
        self.step = steps.pop()

    @property
    def fresh(self) -> bool:
        return not self.stored

    @property
    def files(self) -> list[Path]:
        return [c.path for c in self.stored.values()]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.stored.values())

    def read(self, name: str, rows: Rows, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of ``name`` (its ``rows``), shaped like ``w``: stored, or fresh."""
        if not self.stored:
            return self.opt.init(w)
        return {key: stored.read(name, rows) for key, stored in self.stored.items()}


def _metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise MergeError(f"{file}: not a readable safetensors file ({exc})") from None


def open_state_out(
    folder: Path, opt: ServerOpt, layout: dict[str, tuple[int, ...]], step: int
) -> dict[str, ShardWriter]:
    """One writer per state key, its tensors in the merge's order; none for a stateless optimiser."""
    entries = [(name, shape, torch.float32) for name, shape in layout.items()]
    meta = state_metadata(opt, step)
    return {key: ShardWriter(folder / state_file(key), entries, meta) for key in opt.state_keys()}
