"""The csv dataset with declared dense and sparse (categorical) columns: a click table for DLRM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedfleet.data import load_dataset
from fedfleet.errors import DataError
from fedfleet.models import build_model

CLICKS = """\
user_id,item_id,shop,price,age,note,clicked
u9,1000003,acme,9.5,31,x,1
u1,2000001,,3.0,22,y,0
u9,1000003,zeta,4.25,31,z,0
u1,999,acme,10,22,w,1
"""


def clicks(tmp_path, text: str = CLICKS):
    path = tmp_path / "clicks.csv"
    path.write_text(text)
    return str(path)


def test_sparse_columns_of_any_values_become_ids_by_sorted_value_with_inferred_cardinalities(tmp_path):
    ds = load_dataset(
        "csv",
        path=clicks(tmp_path),
        label_column="clicked",
        key_column="user_id",
        sparse=["user_id", "item_id", "shop"],
        dense=["price", "age"],
    )
    layout = ds.features
    assert (layout.dense, layout.sparse) == (("price", "age"), ("user_id", "item_id", "shop"))
    assert layout.cardinalities == (2, 3, 3)
    # dense first, then ids: user u1 < u9; items by number (999 < 1000003 < 2000001); the empty shop is "" < acme < zeta
    assert ds.x.tolist() == [
        [9.5, 31.0, 1.0, 1.0, 1.0],
        [3.0, 22.0, 0.0, 2.0, 0.0],
        [4.25, 31.0, 1.0, 1.0, 2.0],
        [10.0, 22.0, 0.0, 0.0, 1.0],
    ]
    assert ds.y.tolist() == [1, 0, 0, 1] and ds.num_classes == 2
    assert ds.keys.tolist() == ["u9", "u1", "u9", "u1"]  # the key is also an embedded feature
    layout.check(ds.x)


def test_columns_by_position_and_the_rest_dense_when_only_sparse_is_named(tmp_path):
    text = CLICKS.replace(",note", "").replace(",x,", ",").replace(",y,", ",").replace(",z,", ",").replace(",w,", ",")
    ds = load_dataset("csv", path=clicks(tmp_path, text), label_column="clicked", sparse=[0, 1, "shop"])
    assert ds.features.dense == ("price", "age")  # every column not named sparse, the label or the key
    assert ds.features.sparse == ("user_id", "item_id", "shop")
    assert ds.keys is None


def test_a_column_that_already_holds_ids_keeps_them_and_numbers_are_one_category_however_written(tmp_path):
    text = "cat,n,label\n2,7,0\n0,7.0,1\n1,07,0\n2,8,1\n"
    ds = load_dataset("csv", path=clicks(tmp_path, text), sparse=["cat", "n"], dense=[])
    assert ds.x[:, 0].tolist() == [2.0, 0.0, 1.0, 2.0]
    assert ds.x[:, 1].tolist() == [0.0, 0.0, 0.0, 1.0] and ds.features.cardinalities == (3, 2)


def test_hash_buckets_give_ids_that_do_not_depend_on_which_rows_a_party_holds(tmp_path):
    whole = load_dataset("csv", path=clicks(tmp_path), label_column="clicked", sparse=["item_id", "shop"],
                         dense=["price"], hash_buckets={"item_id": 64})  # fmt: skip
    assert whole.features.cardinalities == (64, 3)  # shop keeps its vocabulary
    part = tmp_path / "part"
    part.mkdir()
    rows = CLICKS.splitlines()
    half = load_dataset("csv", path=clicks(part, "\n".join([rows[0], rows[4], rows[2]]) + "\n"),
                        label_column="clicked", sparse=["item_id"], dense=["price"], hash_buckets=64)  # fmt: skip
    assert half.x[:, 1].tolist() == [whole.x[3, 1].item(), whole.x[1, 1].item()]
    # stable across processes (Python's own hash() of a string is salted per process)
    code = (
        "from fedfleet.data import load_dataset; "
        f"print(load_dataset('csv', path={str(part / 'clicks.csv')!r}, label_column='clicked', sparse=['item_id'], "
        "dense=['price'], hash_buckets=64).x[:, 1].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(half.x[:, 1].tolist())


def test_a_dlrm_builds_and_runs_on_the_declared_layout(tmp_path):
    ds = load_dataset("csv", path=clicks(tmp_path), label_column="clicked", key_column="user_id",
                      sparse=["user_id", "item_id", "shop"], dense=["price", "age"])  # fmt: skip
    model = build_model("dlrm", ds.input_shape, ds.num_classes, features=ds.features, embedding_dim=4)
    assert tuple(model.embeddings["item_id"].weight.shape) == (3, 4)
    assert model(ds.x).shape == (4, 1) and torch.isfinite(model(ds.x)).all()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sparse": ["item_idd"]}, r"data.dataset.sparse: .*has no column 'item_idd'.*\(did you mean 'item_id'\?\)"),
        ({"dense": [9]}, r"data.dataset.dense: column 9 is past the 7 columns of .*\(positions 0 to 6\)"),
        ({"sparse": ["shop"], "dense": ["price", "shop"]}, "column 'shop' is in both data.dataset.dense and .sparse"),
        ({"dense": ["price", "note"]}, r"column 'note' holds 'x' on line 2 of .*clicks.csv, not a number"),
        ({"sparse": ["clicked"]}, "the label column 'clicked' cannot also be a feature"),
        ({"sparse": ["shop", "shop"]}, "data.dataset.sparse names column 'shop' twice"),
        ({"sparse": [True]}, "data.dataset.sparse: a column is a name or a 0-based position, got True"),
        ({"sparse": ["shop"], "hash_buckets": {"price": 8}}, "hash_buckets names 'price', which is not a sparse"),
        ({"sparse": ["shop"], "hash_buckets": 0}, "hash_buckets must be whole numbers from 1 to 16777216, got 0"),
        ({"sparse": ["shop"], "dense": ["price"], "shape": [1, 1, 3]}, "shape cannot be combined with dense/sparse"),
    ],
)
def test_each_problem_names_the_column(tmp_path, params, message):
    with pytest.raises(DataError, match=message):
        load_dataset("csv", path=clicks(tmp_path), label_column="clicked", **params)


def test_bad_labels_and_empty_dense_cells_are_named(tmp_path):
    with pytest.raises(DataError, match=r"column 'price' is empty on line 3 of .*clicks.csv"):
        load_dataset("csv", path=clicks(tmp_path, "price,label\n1,0\n,1\n"), dense=["price"])
    with pytest.raises(DataError, match=r"label column 'label' holds '0.5' on line 2 .*whole number"):
        load_dataset("csv", path=clicks(tmp_path, "price,label\n1,0.5\n2,1\n"))
    with pytest.raises(DataError, match="has a header but no rows"):
        load_dataset("csv", path=clicks(tmp_path, "price,label\n"))


def test_a_repeated_header_name_is_still_two_columns_and_position_zero_can_be_the_key(tmp_path):
    ds = load_dataset("csv", path=clicks(tmp_path, "user,a,a,label\nu1,1,2,0\nu2,3,4,1\n"), key_column=0)
    assert ds.x.tolist() == [[1.0, 2.0], [3.0, 4.0]] and ds.keys.tolist() == ["u1", "u2"]
    with pytest.raises(DataError, match="names 'a' twice; give its position instead"):
        load_dataset("csv", path=clicks(tmp_path, "user,a,a,label\nu1,1,2,0\n"), sparse=["a"])
