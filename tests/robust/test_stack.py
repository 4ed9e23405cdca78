"""The rules that hold every update: spilled to disk above spill_mb with the same result as in RAM, refusing
NaN, inf, misshapen and mistyped updates (counted, never folded), and reporting anomaly scores."""

import pytest
import torch

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.robust import UpdateStack
from fedfleet.strategy import build_strategy
from fedfleet.transforms import build_pipeline
from tests.robust.helpers import aggregate, as_update, honest, result, with_attackers

RULES = [
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("krum", {"f": 2, "m": 3}),
    ("bulyan", {"f": 2}),
    ("geomedian", {}),
    ("centered_clip", {"tau": 1.0}),
]


def two_dtypes(value: torch.Tensor, extra: float = 0.0) -> FlatParams:
    """A layout of a float32 and a float64 tensor: the stack keeps rows in float64 then."""
    return FlatParams.from_tensors({"a": value[:40].clone(), "b": (value[40:].double() + extra)})


@pytest.mark.parametrize(("name", "params"), RULES)
def test_a_spilled_round_gives_the_same_result_as_in_ram_and_leaves_no_file(name, params, tmp_path):
    rows = with_attackers(honest(9), 2, "flip_scale_100")
    in_ram = aggregate(name, params, rows)
    spill = {**params, "spill_mb": 0.001, "spill_dir": str(tmp_path)}  # 1 KiB: the first row spills already
    spilled = aggregate(name, spill, rows)
    assert torch.equal(result(in_ram), result(spilled))
    assert "robust_spilled_mb" in spilled.metrics and "robust_spilled_mb" not in in_ram.metrics
    assert spilled.metrics["robust_spilled_mb"] == pytest.approx(11 * 64 * 4 / 2**20)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_a_stack_spills_when_the_next_row_would_pass_the_bound_and_reads_the_same_blocks(tmp_path):
    like = FlatParams.from_tensors({"w": torch.zeros(256)})
    rows = honest(6, dim=256)
    ram, disk = UpdateStack(like, spill_mb=10), UpdateStack(like, spill_mb=3 * 1024 / 2**20, spill_dir=str(tmp_path))
    for i, row in enumerate(rows):
        assert ram.add(as_update(row, i)) is None and disk.add(as_update(row, i)) is None
        assert disk.spilled == (i >= 3)  # 1 KiB rows: the fourth passes 3 KiB
    assert ram.gram().equal(disk.gram())
    half = torch.full((2,), 0.5)
    assert torch.equal(ram.combine(half, rows=[1, 4]), disk.combine(half, rows=[1, 4]))
    folder = next(tmp_path.iterdir())
    assert (folder / "rows.bin").stat().st_size == 6 * 256 * 4
    disk.close()
    assert not folder.exists()


def test_two_dtypes_are_kept_in_float64_and_written_back_in_their_own():
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(64, generator=gen) for _ in range(5)]
    pipeline = build_pipeline(server=[("median", {})])
    agg = pipeline.aggregator(build_strategy("fedavg"), two_dtypes(torch.zeros(64)))
    for i, v in enumerate(values):
        agg.add(Update(two_dtypes(v, extra=1e-12 * i), 1.0, client_id=i))
    out = agg.finish().params.tensors()
    stacked = torch.stack(values)
    assert out["a"].dtype == torch.float32 and out["b"].dtype == torch.float64
    assert torch.equal(out["a"], stacked[:, :40].median(0).values)
    exact = torch.stack([v[40:].double() + 1e-12 * i for i, v in enumerate(values)])  # lost in float32
    assert torch.equal(out["b"], exact.median(0).values)


@pytest.mark.parametrize(("name", "params"), [*RULES, ("norm_bound", {"max_norm": 1.0})])
def test_nan_inf_misshapen_mistyped_and_negative_weight_updates_are_refused_and_counted(name, params):
    good = with_attackers(honest(9), 2, "sign_flip")
    expected = result(aggregate(name, params, good))
    pipeline = build_pipeline(server=[(name, params)])
    agg = pipeline.aggregator(build_strategy("fedavg"), FlatParams.from_tensors({"w": torch.zeros(64)}))
    nan, inf = good[0].clone(), good[1].clone()
    nan[3], inf[5] = float("nan"), float("inf")
    bad = [
        Update(FlatParams.from_tensors({"w": nan}), 1.0, client_id=100),
        Update(FlatParams.from_tensors({"w": inf}), 1.0, client_id=101),
        Update(FlatParams.from_tensors({"w": torch.zeros(65)}), 1.0, client_id=102),  # another shape
        Update(FlatParams.from_tensors({"w": torch.zeros(64, dtype=torch.float64)}), 1.0, client_id=103),  # dtype
        Update(FlatParams.from_tensors({"v": torch.zeros(64)}), 1.0, client_id=104),  # another name
        Update(FlatParams.from_tensors({"w": good[2].clone()}), -1.0, client_id=105),  # a negative weight
    ]
    for i, row in enumerate(good):
        agg.add(as_update(row, i))
        if i < len(bad):
            agg.add(bad[i])
    out = agg.finish()
    assert out.count == len(good) and out.metrics["left_out"] == len(bad)
    assert out.metrics["robust_refused"] == len(bad)
    assert torch.allclose(result(out), expected, rtol=0, atol=1e-6)
    assert out.metrics["robust_refused_nonfinite"] == 2 and out.metrics["robust_refused_layout"] == 3
    assert out.metrics["robust_refused_weight"] == 1


def test_anomaly_scores_name_the_distances_to_the_aggregate_and_flag_the_attackers():
    h = honest(16)
    out = aggregate("median", {}, with_attackers(h, 4, "scale_10"))
    m = out.metrics
    assert m["robust_flagged"] == 4  # the four boosted updates, far beyond 3 x the median distance
    d = (with_attackers(h, 4, "scale_10") - result(out)).norm(dim=1)
    assert m["robust_dist_max"] == pytest.approx(float(d.max()), rel=1e-5)
    assert m["robust_dist_mean"] == pytest.approx(float(d.mean()), rel=1e-5)
    assert m["robust_dist_median"] == pytest.approx(float(d.median()), rel=1e-5)
    assert m["robust_refused"] == 0
