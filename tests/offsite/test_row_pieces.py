"""An embedding shared as numbered row pieces, the FATE tutorial's way (wte0 ... wte9), and joined back."""

import numpy as np
import pytest
import torch

from fedfleet.errors import ConfigError
from fedfleet.offsite import join_rows, recover_numpy_array, split_numpy_array, split_rows


def test_ten_pieces_of_gpt2s_embedding_join_back_exactly_and_are_views():
    wte = torch.randn(50257, 8)
    pieces = split_rows(wte, 10, "wte")
    assert list(pieces) == [f"wte{i}" for i in range(10)]
    sizes = [len(p) for p in pieces.values()]
    assert sum(sizes) == 50257 and max(sizes) - min(sizes) <= 1
    assert all(p.data_ptr() == wte[sum(sizes[:i]) :].data_ptr() for i, p in enumerate(pieces.values()))  # views
    back = join_rows({**pieces, "wpe": torch.zeros(3)}, "wte")  # other extras beside them are ignored
    assert torch.equal(back, wte)


def test_fates_names_take_numpy_as_its_tutorial_does():
    table = np.arange(40.0).reshape(20, 2)
    pieces = split_numpy_array(table, 3, "emb")
    assert np.array_equal(recover_numpy_array(pieces, "emb"), table)


def test_a_missing_piece_or_an_impossible_cut_is_named():
    pieces = split_rows(torch.zeros(10, 2), 4, "w")
    del pieces["w2"]
    with pytest.raises(ConfigError, match="w2 are missing"):
        join_rows(pieces, "w")
    with pytest.raises(ConfigError, match="cannot cut 3 rows into 5 pieces"):
        split_rows(torch.zeros(3, 2), 5, "w")
