"""Pre-tokenised corpora for compute nodes without network: ``fedfleet tokenize`` writes them, a party reads them.

A corpus is a folder made where the text is (a login node, a laptop)::

    manifest.json                         format, seq_len, dtype, counts, the tokenizer's fingerprints,
                                          the sources' and every shard's SHA-256
    tokens-00001-of-00003.safetensors     one tensor ``input_ids`` of shape (blocks, seq_len)
    tokenizer/                            the tokenizer, saved, so the node loads it offline

Documents are concatenated with the tokenizer's end-of-text id between them and cut into blocks of ``seq_len``
ids (causal-LM packing, as xFFL's and llama-recipes' datasets are); the last partial block is dropped and counted.
The folder is built under a temporary name and renamed into place, so a half-written corpus is never read.

:class:`TokenBlocks` is the dataset a party trains on: ``{"input_ids", "labels"}`` rows memory-mapped from the
shards (O(1) memory, whatever the corpus size), every shard's checksum verified when it is opened, and the
party's tokenizer compared with the one the ids were made with (ids from another vocabulary are refused, as the
join refuses them between parties).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedfleet.errors import DataError

FORMAT = "fedfleet-token-blocks/1"
MANIFEST = "manifest.json"
TENSOR = "input_ids"
_HEADER_MAX = 1 << 20  # a shard's JSON header is a few hundred bytes; more is not a file this module wrote


# -- reading text sources: one reader per suffix ---------------------------------------------------
def _txt(path: Path, column: str) -> Iterator[str]:
    """One document per non-empty line."""
    with path.open(encoding="utf-8") as f:
        yield from (line.rstrip("\n") for line in f if line.strip())


def _jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(column), str):
                raise DataError(f"{path}:{number}: no string field {column!r} (choose it with --text-column)")
            yield row[column]


def _csv(path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or ()):
            raise DataError(f"{path}: no column {column!r}; its columns: {', '.join(reader.fieldnames or ())}")
        yield from (row[column] for row in reader if row[column])


READERS: dict[str, Callable[[Path, str], Iterator[str]]] = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSummary:
    """What :func:`tokenize_corpus` wrote."""

    path: Path
    documents: int
    tokens: int
    blocks: int
    dropped_tokens: int
    shards: int
    seconds: float


def tokenize_corpus(
    sources: Iterable[str | Path],
    tokenizer: Any,
    out: str | Path,
    *,
    seq_len: int = 512,
    text_column: str = "text",
    shard_bytes: int = 256 << 20,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CorpusSummary:
    """Tokenise ``sources`` (.txt: a document per line; .jsonl / .csv: the ``text_column`` field) into the corpus
    folder ``out``. ``overwrite`` replaces only a folder that is itself a corpus (it has this module's manifest)."""
    started = time.monotonic()
    files = [Path(s) for s in sources]
    out = Path(out)
    _check_inputs(files, out, seq_len, shard_bytes, overwrite)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-text (eos or sep) token to put between documents")
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.int32)
    rows_per_shard = max(1, shard_bytes // (seq_len * dtype.itemsize))
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # ours: a name only this process uses
    partial.mkdir(parents=True)
    writer = _ShardWriter(partial, seq_len, dtype, rows_per_shard)
    documents = 0
    report = _Every(10.0)
    try:
        for file in files:
            for batch in _batches(READERS[file.suffix.lower()](file, text_column), 256):
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    writer.add([*ids, eos])
                documents += len(batch)
                if progress is not None and report.due():
                    progress(f"{documents:,} documents, {writer.tokens:,} tokens, {writer.shard_count} shards")
        writer.close()
        tokenizer.save_pretrained(str(partial / "tokenizer"))
        fingerprints = _fingerprints(tokenizer)
        manifest = {
            "format": FORMAT,
            "seq_len": seq_len,
            "dtype": dtype.name,
            "documents": documents,
            "tokens": writer.tokens,
            "blocks": writer.rows,
            "dropped_tokens": writer.dropped,
            "eos_token_id": int(eos),
            "tokenizer_fingerprint": fingerprints[0],
            "vocab_fingerprint": fingerprints[1],
            "sources": [{"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files],
            "shards": writer.renamed(),
        }
        _write_json(partial / MANIFEST, manifest)
        if out.exists():  # checked to be a corpus by _check_inputs
            shutil.rmtree(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CorpusSummary(
        out, documents, writer.tokens, writer.rows, writer.dropped, len(manifest["shards"]), time.monotonic() - started
    )


def _check_inputs(files: list[Path], out: Path, seq_len: int, shard_bytes: int, overwrite: bool) -> None:
    if not files:
        raise DataError("no text files given")
    for file in files:
        if file.suffix.lower() not in READERS:
            raise DataError(f"{file}: unknown kind of text file; give {', '.join(READERS)} files")
        if not file.is_file():
            raise DataError(f"{file}: no such file")
    if seq_len < 2:
        raise DataError(f"seq_len {seq_len}: a block needs at least 2 tokens (an input and its next token)")
    if shard_bytes < 1:
        raise DataError(f"shard_bytes {shard_bytes}: must be positive")
    if out.exists():
        if not (out / MANIFEST).is_file():
            raise DataError(f"{out} exists and is not a tokenised corpus: give another --out (nothing was touched)")
        if not overwrite:
            raise DataError(f"{out} already holds a tokenised corpus; pass --overwrite to replace it")
        foreign = [p.name for p in out.iterdir() if not _ours(p.name)]
        if foreign:  # --overwrite replaces what tokenize wrote, never what the user put beside it
            raise DataError(f"{out} holds files tokenize did not write ({', '.join(sorted(foreign)[:5])}): move them")


def _ours(name: str) -> bool:
    return name in (MANIFEST, "tokenizer") or (name.startswith("tokens-") and name.endswith(".safetensors"))


class _ShardWriter:
    """Packs documents' ids into rows of ``seq_len`` and writes full shards as they fill (bounded memory)."""

    def __init__(self, folder: Path, seq_len: int, dtype: np.dtype, rows_per_shard: int) -> None:
        self.folder, self.seq_len, self.dtype, self.rows_per_shard = folder, seq_len, dtype, rows_per_shard
        self.pending: list[int] = []
        self.full: list[np.ndarray] = []  # rows of the shard being filled
        self.written: list[tuple[Path, int]] = []
        self.tokens = self.rows = 0
        self.dropped = 0

    @property
    def shard_count(self) -> int:
        return len(self.written)

    def add(self, ids: list[int]) -> None:
        self.pending.extend(ids)
        self.tokens += len(ids)
        while len(self.pending) >= self.seq_len:
            self.full.append(np.asarray(self.pending[: self.seq_len], dtype=self.dtype))
            del self.pending[: self.seq_len]
            if len(self.full) == self.rows_per_shard:
                self._flush()

    def close(self) -> None:
        self.dropped = len(self.pending)
        if self.full:
            self._flush()
        if not self.written:
            raise DataError(f"the text holds {self.tokens} tokens: fewer than one block of seq_len {self.seq_len}")

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        path = self.folder / f"shard-{len(self.written):05d}.safetensors"
        save_file({TENSOR: np.stack(self.full)}, str(path))
        self.rows += len(self.full)
        self.written.append((path, len(self.full)))
        self.full = []

    def renamed(self) -> list[dict[str, Any]]:
        """The shards under their final names (``tokens-0000i-of-0000n``, known once the count is), with sums."""
        n = len(self.written)
        entries = []
        for i, (path, rows) in enumerate(self.written, 1):
            final = path.with_name(f"tokens-{i:05d}-of-{n:05d}.safetensors")
            path.rename(final)
            with final.open("rb+") as f:  # on disk before the folder is renamed into place
                os.fsync(f.fileno())
            entries.append({"file": final.name, "rows": rows, "sha256": _sha256(final)})
        return entries


# -- reading ---------------------------------------------------------------------------------------
class TokenBlocks(Dataset):
    """The blocks of a corpus folder as ``{"input_ids": LongTensor[seq_len], "labels": the same}``.

    ``tokenizer``: the party's; refused when its ids mean other tokens than the corpus's (``vocab_fingerprint``).
    ``verify``: check every shard's SHA-256 against the manifest before reading it (reads each file once).
    """

    def __init__(self, path: str | Path, tokenizer: Any = None, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_len = int(self.manifest["seq_len"])
        self.dtype = np.dtype(self.manifest["dtype"])
        if tokenizer is not None:
            mine = _fingerprints(tokenizer)[1]
            if mine != self.manifest["vocab_fingerprint"]:
                raise DataError(
                    f"{self.path}: its token ids were made by another tokenizer (vocabulary "
                    f"{self.manifest['vocab_fingerprint'][:12]}, this one {mine[:12]}): use the one saved in "
                    f"{self.path / 'tokenizer'}, or tokenise again with yours"
                )
        self.shards: list[tuple[Path, int]] = []
        for entry in self.manifest["shards"]:
            file = self.path / Path(entry["file"]).name  # a name, never a path out of the folder
            if not file.is_file():
                raise DataError(f"{file}: a shard the manifest lists is missing")
            if verify and _sha256(file) != entry["sha256"]:
                raise DataError(f"{file}: its SHA-256 is not the manifest's: the file is damaged or was changed")
            self.shards.append((file, int(entry["rows"])))
        self.starts = np.cumsum([0] + [rows for _, rows in self.shards])
        self._maps: dict[int, np.memmap] = {}  # opened on first use, in each DataLoader worker of its own

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        row = torch.from_numpy(self._map(shard)[index - self.starts[shard]].astype(np.int64))
        return {"input_ids": row, "labels": row.clone()}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # maps are reopened in the worker, not pickled

    def _map(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            file, rows = self.shards[shard]
            self._maps[shard] = _tensor_map(file, self.dtype, (rows, self.seq_len))
        return self._maps[shard]


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(f"{path}: not a tokenised corpus (no {MANIFEST}; make one with fedfleet tokenize)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file}: not a manifest of {FORMAT}")
    missing = [k for k in ("seq_len", "dtype", "shards", "vocab_fingerprint") if k not in manifest]
    if missing or manifest["dtype"] not in ("uint16", "int32") or not isinstance(manifest["shards"], list):
        raise DataError(f"{file}: a damaged manifest (missing or bad: {', '.join(missing) or 'dtype/shards'})")
    return manifest


def _tensor_map(file: Path, dtype: np.dtype, shape: tuple[int, int]) -> np.memmap:
    """A read-only map of the shard's one tensor, located by the safetensors header (8-byte length, JSON)."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= _HEADER_MAX:
            raise DataError(f"{file}: not a safetensors file")
        try:
            header = json.loads(f.read(size))
            start, stop = header[TENSOR]["data_offsets"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{file}: not a shard of a tokenised corpus (no {TENSOR!r} tensor)") from None
    if header[TENSOR].get("shape") != list(shape) or stop - start != shape[0] * shape[1] * dtype.itemsize:
        raise DataError(f"{file}: its tensor is {header[TENSOR].get('shape')}, the manifest says {list(shape)}")
    return np.memmap(file, dtype=dtype, mode="r", offset=8 + size + start, shape=shape)


# -- small helpers ---------------------------------------------------------------------------------
def _fingerprints(tokenizer: Any) -> tuple[str, str]:
    from fedfleet.hf.data.tokenizer import tokenizer_fingerprint, vocab_fingerprint

    return tokenizer_fingerprint(tokenizer), vocab_fingerprint(tokenizer)


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


class _Every:
    """True once every ``seconds`` (progress lines on long corpora, none on short ones)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last = seconds, time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def stderr_progress(line: str) -> None:
    print(f"fedfleet tokenize: {line}", file=sys.stderr, flush=True)
