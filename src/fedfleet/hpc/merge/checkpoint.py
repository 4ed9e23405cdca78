"""Reading a Hugging Face checkpoint tensor by tensor: a folder with ``model.safetensors``, or with sharded files
listed by ``model.safetensors.index.json``, or one ``.safetensors`` file; fp32, bf16 or fp16 tensors.

Opening reads the headers only (names, shapes, dtypes). A tensor's bytes (or a block of its rows) are read when
asked for, through a ``safe_open`` of its shard that is closed again before they are returned: safetensors maps
the whole file, and every page a read touches stays in the process's resident set for as long as the map is
open, so a handle kept open across a 2 GB shard would grow the RSS to 2 GB. Reopening costs one header parse per
read (~0.1 ms).
Only safetensors is ever read: no pickle, no ``torch.load``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fedfleet.hpc.merge.errors import MergeError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype names <-> torch; the float types a checkpoint's weights come in
FROM_SAFETENSORS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TO_SAFETENSORS = {v: k for k, v in FROM_SAFETENSORS.items()}
# the names a user gives on the command line
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, from its shard's header."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A checkpoint's layout (``tensors``: name -> TensorInfo, in file order) and its tensors, one at a time."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path
        if path.is_file() and path.suffix == ".safetensors":
            self.folder = path.parent
            self.index: Path | None = None
            self.tensors = _header(path)
        elif path.is_dir() and (path / INDEX).is_file():
            self.folder = path
            self.index = path / INDEX
            self.tensors = _indexed(path / INDEX)
        elif path.is_dir() and (path / SINGLE).is_file():
            self.folder = path
            self.index = None
            self.tensors = _header(path / SINGLE)
        elif path.exists():
            raise MergeError(f"{path}: no {SINGLE} or {INDEX} here (a Hugging Face checkpoint folder has one)")
        else:
            raise MergeError(f"{path}: no such checkpoint folder or file")
        if not self.tensors:
            raise MergeError(f"{path}: the checkpoint holds no tensors")

    @property
    def files(self) -> list[Path]:
        """The files the merge reads: the shards and, if there is one, the index."""
        shards = list(dict.fromkeys(t.file for t in self.tensors.values()))
        return [*shards, self.index] if self.index else shards

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or its rows ``start:stop`` along the first dimension) in its stored dtype, read from disk
        now; the file is unmapped again before this returns."""
        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                if rows is None or not info.shape:
                    return f.get_tensor(name)
                return f.get_slice(name)[rows[0] : rows[1]]
        except (SafetensorError, OSError) as exc:
            raise MergeError(f"{info.file}: tensor {name!r} cannot be read ({exc})") from None

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, {len(self.tensors)} tensors)"


def _header(file: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(str(file), framework="pt") as f:
            infos = {}
            for name in f.keys():  # noqa: SIM118 -- a safetensors handle is not a dict
                piece = f.get_slice(name)
                stored = piece.get_dtype()
                if stored not in FROM_SAFETENSORS:
                    raise MergeError(
                        f"{file}: tensor {name!r} is {stored}; merge reads fp32, bf16 and fp16 tensors only"
                    )
                infos[name] = TensorInfo(name, tuple(piece.get_shape()), FROM_SAFETENSORS[stored], file)
            return infos
    except SafetensorError as exc:
        raise MergeError(f"{file}: not a readable safetensors file ({exc})") from None


def _indexed(index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{index}: not a safetensors index (a JSON object with a weight_map; {exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergeError(f"{index}: weight_map must map tensor names to shard file names")
    infos: dict[str, TensorInfo] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):  # a shard is a file beside the index, no path
            raise MergeError(f"{index}: shard {shard!r} is not a plain file name beside the index")
        file = index.parent / shard
        if not file.is_file():
            raise MergeError(f"{index}: shard {shard} is missing (expected at {file})")
        held = _header(file)
        for name in (n for n, s in weight_map.items() if s == shard):
            if name not in held:
                raise MergeError(f"{file}: tensor {name!r} is not in this shard, though {index.name} puts it there")
            infos[name] = held[name]
    return infos


def check_same_layout(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint holds the first one's tensors, shaped alike (dtypes may differ): else the first difference,
    naming the files."""
    ref = checkpoints[0]
    for other in checkpoints[1:]:
        for name, info in ref.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                raise MergeError(f"tensor {name!r} is missing from {other.path} (it is in {info.file})")
            if theirs.shape != info.shape:
                raise MergeError(
                    f"tensor {name!r} is shaped {list(theirs.shape)} in {theirs.file} but {list(info.shape)} in "
                    f"{info.file}: these checkpoints are not of one model"
                )
        extra = next((n for n in other.tensors if n not in ref.tensors), None)
        if extra is not None:
            raise MergeError(f"tensor {extra!r} of {other.tensors[extra].file} is not in {ref.path}")
