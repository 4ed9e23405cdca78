"""Clipping, noise and adaptive clipping: each bound checked on tiny known vectors or with a statistical test."""

import math

import numpy as np
import pytest
import torch

from fedfleet.core.aggregate import WeightedMean
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update
from fedfleet.errors import ConfigError
from fedfleet.privacy import AdaptiveClipConfig, CentralGaussian
from fedfleet.privacy.adaptive import AdaptiveClip, update_multiplier
from fedfleet.privacy.clipping import clip_flat_, clip_per_layer_
from fedfleet.privacy.noise import add_gaussian_, noise_key, normals


def params(*values: list[float]) -> FlatParams:
    return FlatParams.from_tensors({f"t{i}": torch.tensor(v) for i, v in enumerate(values)})


def norm(p: FlatParams) -> float:
    return math.sqrt(p.sq_norm())


def test_every_clipped_update_has_norm_at_most_c_flat_and_per_layer():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        for clip in (clip_flat_, clip_per_layer_):
            p = FlatParams.from_tensors({"a": torch.randn(50, generator=g) * scale, "b": torch.randn(7, generator=g)})
            before = norm(p)
            assert clip(p, 1.0) == pytest.approx(before)
            assert norm(p) <= 1.0 + 1e-6
    p = params([3.0, 4.0])  # by hand: norm 5 -> scaled to norm 1
    clip_flat_(p, 1.0)
    assert torch.allclose(p.buffers[torch.float32], torch.tensor([0.6, 0.8]))
    p = params([3.0, 4.0], [0.1])  # per layer: each tensor within 1 / sqrt(2); the small one untouched
    clip_per_layer_(p, 1.0)
    t = p.tensors()
    assert t["t0"].norm().item() == pytest.approx(1 / math.sqrt(2), rel=1e-6) and t["t1"].item() == pytest.approx(0.1)


def test_a_zero_update_is_fine_and_a_nan_one_is_refused():
    p = params([0.0, 0.0])
    assert clip_flat_(p, 1.0) == 0.0 and p.buffers[torch.float32].eq(0).all()
    assert clip_per_layer_(p, 1.0) == 0.0
    with pytest.raises(ValueError, match="NaN or inf"):
        clip_flat_(params([float("nan"), 1.0]), 1.0)


def test_the_generator_is_standard_normal_seeded_reproducible_and_secure_fresh():
    z = normals(noise_key("seeded", 1, 2, "x"), 400_000)
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.std() - 1) < 5 / math.sqrt(2 * z.size)
    assert abs(np.mean(z**4) - 3) < 0.05  # a Gaussian's kurtosis, not a uniform's or a Laplace's
    assert np.array_equal(z[:1000], normals(noise_key("seeded", 1, 2, "x"), 1000))
    assert not np.array_equal(z[:1000], normals(noise_key("seeded", 1, 3, "x"), 1000))
    assert noise_key("secure", 1, 2, "x") != noise_key("secure", 1, 2, "x")


def test_noise_is_added_in_every_dtype_buffer_and_zero_std_adds_nothing():
    p = FlatParams.from_tensors({"a": torch.zeros(100_000), "h": torch.zeros(100_000, dtype=torch.float16)})
    add_gaussian_(p, 0.0, b"k" * 32)
    assert all(b.eq(0).all() for b in p.buffers.values())
    add_gaussian_(p, 3.0, b"k" * 32)
    for buf in p.buffers.values():
        assert buf.float().std().item() == pytest.approx(3.0, rel=0.02)


def fold(transform: CentralGaussian, updates: list[FlatParams], weights=None):
    transform.start_round(updates[0].zeros_like(), WeightedMean(updates[0]))
    inner = WeightedMean(updates[0])
    for i, u in enumerate(updates):
        kept = transform.before_fold(Update(u.clone(), weights[i] if weights else 10.0 * (i + 1)))
        inner.add(kept)
    return transform.after_fold(inner.finish())


def test_with_all_zero_updates_the_noise_on_the_mean_has_std_z_c_over_m():
    z, c, m, n = 1.3, 0.7, 25, 200_000
    zeros = [FlatParams.from_tensors({"w": torch.zeros(n)}) for _ in range(20)]  # 20 of the 25 expected came
    out = fold(CentralGaussian(z, m, c, noise="seeded"), zeros).params.buffers[torch.float32].double()
    want = z * c / m
    # the sample std of n normals is within 5 standard errors (want / sqrt(2 n)) of the truth
    assert abs(out.std().item() - want) < 5 * want / math.sqrt(2 * n)
    assert abs(out.mean().item()) < 5 * want / math.sqrt(n)


def test_the_fixed_denominator_mean_and_uniform_weights():
    a, b = params([3.0, 4.0]), params([0.3, 0.0])  # norms 5 (clipped to 1) and 0.3; weights are ignored
    agg = fold(CentralGaussian(0.0, 4, 1.0), [a, b], weights=[1.0, 1000.0])
    assert torch.allclose(agg.params.buffers[torch.float32], torch.tensor([(0.6 + 0.3) / 4, 0.8 / 4]))
    assert agg.weight == 4 and "__dp_unclipped" not in agg.metrics


def test_central_dp_refuses_an_aggregator_that_is_not_a_weighted_mean():
    class Median:
        pass

    with pytest.raises(ConfigError, match="weighted mean of clipped deltas"):
        CentralGaussian(1.0, 4).start_round(None, Median())


@pytest.mark.parametrize("start", [0.1, 10.0])
def test_adaptive_clipping_settles_at_the_target_quantile_from_either_side(start):
    """Lognormal norms with median 1, quantile 0.5: the paper's rule settles near 1 (Flower's, which counts the
    clipped fraction instead, runs away from 0.1 to 2.5e-4)."""
    rng = np.random.default_rng(0)
    clip = AdaptiveClip(AdaptiveClipConfig(quantile=0.5, lr=0.2), start, expected_count=100)
    late = []
    for r in range(150):
        norms = rng.lognormal(0.0, 1.0, 100)
        clip.step((norms <= clip.clip).sum() + rng.normal(0.0, clip.count_std))
        if r >= 100:
            late.append(clip.clip)
    assert 0.8 < np.mean(late) < 1.25


def test_adaptive_clipping_through_the_transform_moves_c_and_splits_the_noise():
    big = [params([30.0, 40.0]) for _ in range(10)]  # every norm 50 > C: the clip must grow
    dp = CentralGaussian(1.0, 40, 0.5, adaptive={"quantile": 0.5, "lr": 0.2}, noise="seeded")  # count std 40 / 20
    assert dp.z_update == pytest.approx(update_multiplier(1.0, 2.0)) and dp.z_update > 1.0
    for _ in range(5):
        fold(dp, [p.clone() for p in big])
    assert dp.clip > 0.5 * math.exp(0.2 * 0.5 * 4)  # five steps of about exp(0.1) each (none unclipped)
    assert "dp_unclipped_fraction" in dp.round_metrics()
    with pytest.raises(ConfigError, match="count_std must be > 1 / \\(2 z\\)"):
        CentralGaussian(1.0, 10, adaptive={"count_std": 0.4})
