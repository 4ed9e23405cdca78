"""The ``csv`` dataset: your own table, with a label, optionally a user key, numeric and categorical columns.

    data:
      dataset: {name: csv, path: clicks.csv, label_column: clk, key_column: userid,
                sparse: [userid, adgroup_id, cate_id, brand], dense: [price, age_level]}
      partition: natural      # one client per distinct userid
      clients: null

Columns are named by their header or given by 0-based position. ``dense`` columns must hold numbers. ``sparse``
(categorical) columns may hold anything, strings or large ids, and an empty cell is a category of its own; each
becomes category ids 0 .. cardinality - 1, with the cardinality counted from the file. The ids follow the sorted
distinct values (numerically when every cell of the column is a number, so ``7`` and ``7.0`` are one category and
a column that already holds 0 .. k - 1 keeps its ids; else as text), so every party that reads the same file gets
the same ids. Parties that read different files would not: ``hash_buckets`` maps each value to
``stable hash % buckets`` instead, the same id on every party whatever rows it holds (the hashing trick; values
may share a bucket).

Without ``dense``, every column that is not the label, the key or sparse is a dense feature; with neither
``dense`` nor ``sparse`` that is the whole table, as a plain numeric input without a feature layout. The key
column may also be a sparse feature (a user id that is both the client and an embedded feature).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedfleet.data.datasets import DATASETS, Dataset, from_tensors
from fedfleet.data.features import MAX_EXACT_ID, FeatureLayout
from fedfleet.errors import DataError

log = logging.getLogger(__name__)

Column = str | int  # a header name or a 0-based position


@DATASETS.register("csv")
def csv_file(
    path: str,
    label_column: Column = "label",
    key_column: Column | None = None,
    shape: list[int] | None = None,
    dense: Sequence[Column] | None = None,
    sparse: Sequence[Column] | None = None,
    hash_buckets: int | Mapping[Column, int] | None = None,
) -> Dataset:
    """A CSV file with a header: a label column, optionally a user-key column, dense and sparse feature columns."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.dataset.path {str(file)!r} does not exist; give the path of a CSV file with a header")
    header = _header(file)
    names = _Names(header, file)  # columns are positions from here on: a header may repeat a name
    label = names.one(label_column, "label_column")
    key = None if key_column is None else names.one(key_column, "key_column")
    sparse_cols = names.many(sparse or (), "sparse")
    if dense is not None:
        dense_cols = names.many(dense, "dense")
    else:  # the rest: every column that is not the label, the key or a sparse feature
        dense_cols = [i for i in range(len(header)) if i not in {label, key, *sparse_cols}]
    _check_roles(header, label, dense_cols, sparse_cols)
    declared = dense is not None or sparse is not None
    if declared and shape:
        raise DataError(
            "data.dataset.shape cannot be combined with dense/sparse: a table with a feature layout stays "
            "(rows, columns), dense first, as DLRM reads it"
        )
    buckets = _buckets(hash_buckets, sparse_cols, names)
    wanted = list(dict.fromkeys([label, *([] if key is None else [key]), *dense_cols, *sparse_cols]))
    unused = [header[i] for i in range(len(header)) if i not in wanted]
    if unused and declared:
        log.info("%s: columns not used (neither dense, sparse, the label nor the key): %s", file, ", ".join(unused))
    table = _read(file, wanted)
    labels = _labels(table[label], header[label], file)
    columns = [_numbers(table[i], header[i], file) for i in dense_cols]
    cardinalities = []
    for column in sparse_cols:
        ids, cardinality = _category_ids(table[column], buckets.get(column))
        columns.append(ids.astype(np.float64))
        cardinalities.append(cardinality)
    x = np.column_stack(columns) if columns else np.zeros((len(labels), 0))
    keys = None if key is None else table[key].copy()  # a copy: a view would keep every cell read alive
    if not declared:
        x = x.reshape(-1, *shape) if shape else x
        return from_tensors(x, labels, keys=keys, name=file.stem)
    dense_names, sparse_names = [header[i] for i in dense_cols], [header[i] for i in sparse_cols]
    _check_unique_names(dense_names + sparse_names, file)
    layout = FeatureLayout(tuple(dense_names), tuple(sparse_names), tuple(cardinalities))
    dataset = from_tensors(x, labels, keys=keys, name=file.stem)
    return Dataset(dataset.x, dataset.y, dataset.num_classes, dataset.keys, dataset.name, layout)


# -- which columns -----------------------------------------------------------------------------------
def _header(file: Path) -> list[str]:
    with open(file, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        row = next(csv.reader(f), None)
    if not row:
        raise DataError(f"{file} is empty; it needs a header row naming the columns")
    return [name.strip() for name in row]  # `new_user_class_level ` (Taobao's header) is new_user_class_level


class _Names:
    """Resolves the job's column references (names or 0-based positions) against the header."""

    def __init__(self, header: list[str], file: Path) -> None:
        self.header = header
        self.file = file

    def one(self, ref: object, key: str) -> int:
        where = f"data.dataset.{key}"
        if isinstance(ref, bool) or not isinstance(ref, str | int):
            raise DataError(f"{where}: a column is a name or a 0-based position, got {ref!r}")
        if isinstance(ref, int):
            if not 0 <= ref < len(self.header):
                raise DataError(
                    f"{where}: column {ref} is past the {len(self.header)} columns of {self.file} "
                    f"(positions 0 to {len(self.header) - 1})"
                )
            return ref
        if ref not in self.header:
            close = difflib.get_close_matches(ref, self.header, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"{where}: {self.file} has no column {ref!r}; its columns are {', '.join(self.header)}{hint}"
            )
        if self.header.count(ref) > 1:
            raise DataError(f"{where}: the header of {self.file} names {ref!r} twice; give its position instead")
        return self.header.index(ref)

    def many(self, refs: Sequence[object], key: str) -> list[int]:
        if isinstance(refs, str | int) or not isinstance(refs, Sequence):
            raise DataError(f"data.dataset.{key} must be a list of columns, e.g. [user_id, item_id], got {refs!r}")
        columns = [self.one(ref, key) for ref in refs]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise DataError(f"data.dataset.{key} names column {self.header[twice[0]]!r} twice")
        return columns


def _check_roles(header: list[str], label: int, dense: list[int], sparse: list[int]) -> None:
    both = [c for c in dense if c in sparse]
    if both:
        raise DataError(
            f"column {header[both[0]]!r} is in both data.dataset.dense and .sparse; a column is one or the other"
        )
    if label in dense or label in sparse:
        raise DataError(f"the label column {header[label]!r} cannot also be a feature (data.dataset.dense / .sparse)")


def _check_unique_names(features: list[str], file: Path) -> None:
    twice = sorted({c for c in features if features.count(c) > 1})
    if twice:
        raise DataError(f"the header of {file} names feature columns {twice} more than once; rename them")


def _buckets(value: object, sparse: list[int], names: _Names) -> dict[int, int]:
    """hash_buckets as {sparse column: buckets}: one number for every sparse column, or a mapping for some."""
    if value is None:
        return {}
    given = value if isinstance(value, Mapping) else dict.fromkeys(sparse, value)
    out = {}
    for ref, buckets in given.items():
        column = names.one(ref, "hash_buckets")
        if column not in sparse:
            raise DataError(f"data.dataset.hash_buckets names {names.header[column]!r}, which is not a sparse column")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= MAX_EXACT_ID:
            raise DataError(
                f"data.dataset.hash_buckets must be whole numbers from 1 to {MAX_EXACT_ID}, got {buckets!r}"
            )
        out[column] = buckets
    return out


# -- reading the cells -------------------------------------------------------------------------------
def _read(file: Path, wanted: list[int]) -> dict[int, np.ndarray]:
    """The wanted columns (by position) as arrays of stripped text (numpy's C reader: no Python object per cell)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": said below, with the file
            cells = np.loadtxt(
                file, delimiter=",", skiprows=1, dtype=str, usecols=wanted, ndmin=2, quotechar='"', comments=None,
                encoding="utf-8",
            )  # fmt: skip
    except ValueError as exc:  # numpy names the row (counted from the first row after the header)
        raise DataError(f"{file}: cannot read the table ({exc}); every row needs the header's cells") from None
    if cells.shape[0] == 0:
        raise DataError(f"{file} has a header but no rows")
    cells = np.char.strip(cells)
    return {c: cells[:, i] for i, c in enumerate(wanted)}  # position in the file -> its cells


def _numbers(cells: np.ndarray, column: str, file: Path) -> np.ndarray:
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values = None
    bad = _first_bad(cells) if values is None else np.flatnonzero(~np.isfinite(values))[:1]
    if len(bad):
        row = int(bad[0])
        what = "is empty" if cells[row] == "" else f"holds {str(cells[row])!r}"
        raise DataError(
            f"dense column {column!r} {what} on line {row + 2} of {file}, not a number: fill it in, or declare the "
            f"column sparse (data.dataset.sparse) if it is a category"
        )
    return values


def _labels(cells: np.ndarray, column: str, file: Path) -> np.ndarray:
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values = None
    if values is None:
        bad = _first_bad(cells)
    else:
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values != np.floor(values)))[:1]
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"label column {column!r} holds {str(cells[row])!r} on line {row + 2} of {file}; labels are class ids, "
            f"each a whole number 0, 1, ... (a click is 1)"
        )
    return values.astype(np.int64)


def _first_bad(cells: np.ndarray) -> np.ndarray:
    """The position of the first cell that is not a finite number (only on the error path: a Python loop)."""
    for i, cell in enumerate(cells.tolist()):
        try:
            if np.isfinite(float(cell)):
                continue
        except ValueError:
            pass
        return np.array([i])
    return np.array([], dtype=np.int64)


def _category_ids(cells: np.ndarray, buckets: int | None) -> tuple[np.ndarray, int]:
    """Ids 0 .. k - 1 by sorted distinct value and k; or stable hashes modulo ``buckets`` and ``buckets``."""
    values = _canonical(cells)
    levels, ids = np.unique(values, return_inverse=True)
    if buckets is None:
        return ids.astype(np.int64), len(levels)
    # hash each distinct value once (a Python loop over the vocabulary, not over the rows); blake2b is the same on
    # every machine and process, where Python's hash() of a string is salted per process
    texts = levels.tolist() if levels.dtype.kind == "U" else [_number_text(v) for v in levels.tolist()]
    level_ids = np.array([_stable_hash(t) % buckets for t in texts], dtype=np.int64)
    return level_ids[ids], buckets


def _canonical(cells: np.ndarray) -> np.ndarray:
    """Whole numbers as int64, other numbers as float64 (``7`` and ``7.0`` are one value), anything else as text."""
    for dtype in (np.int64, np.float64):
        try:
            values = cells.astype(dtype)
        except (ValueError, OverflowError):
            continue
        if dtype is np.int64 or np.isfinite(values).all():
            return values
    return cells


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
