import pytest
import torch
from torch import nn

from fedfleet.core.params import FlatParams, ParamSpec, bind_grads, bind_module, select_params
from fedfleet.core.serialize import load_params, params_from_bytes, params_to_bytes, save_params
from fedfleet.errors import ConfigError


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_bound_module_params_are_views_of_one_flat_buffer():
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = bind_module(model)
    (buf,) = flat.buffers.values()
    assert buf.numel() == 3 * 4 + 4 + 4 * 2 + 2
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])  # values kept
        assert p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    buf.fill_(0.5)  # writing the buffer loads the model
    assert all(bool((p == 0.5).all()) for p in model.parameters())


def test_flat_grads_accumulate_in_place_and_one_op_sgd_matches_torch_sgd():
    ref = small_model()
    model = small_model()
    flat = bind_module(model)
    grads = bind_grads(model, flat)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        grads.zero_()
        nn.functional.mse_loss(model(x), y).backward()
        flat.buffers[torch.float32].add_(grads.buffers[torch.float32], alpha=-0.1)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7), n


def test_selection_trainable_and_regex():
    model = small_model()
    model[0].weight.requires_grad_(False)
    assert [n for n, _ in select_params(model, "trainable")] == ["0.bias", "2.weight", "2.bias"]
    assert [n for n, _ in select_params(model, "re:^2\\.")] == ["2.weight", "2.bias"]
    assert [n for n, _ in select_params(model, lambda n, p: n.endswith("bias"))] == ["0.bias", "2.bias"]
    flat = bind_module(model, "re:^2\\.")
    assert flat.spec.names == ["2.weight", "2.bias"]
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_params(model, "re:nothing")


def test_arithmetic_on_two_dtypes():
    a = FlatParams.from_tensors({"w": torch.tensor([1.0, 2.0]), "d": torch.tensor([1.0], dtype=torch.float64)})
    b = a.clone().mul_(3.0)
    assert set(a.buffers) == {torch.float32, torch.float64}
    a.add_(b, alpha=0.5)  # 1 + 1.5 = 2.5
    assert a.tensors()["w"].tolist() == [2.5, 5.0]
    assert a.tensors()["d"].tolist() == [2.5]
    assert b.sub(a).tensors()["w"].tolist() == [0.5, 1.0]
    assert a.sq_norm() == pytest.approx(2.5**2 + 5.0**2 + 2.5**2)


def test_layout_mismatch_is_refused():
    a = FlatParams.from_tensors({"w": torch.zeros(2)})
    b = FlatParams.from_tensors({"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="layouts differ"):
        a.add_(b)


def test_safetensors_round_trip_bytes_and_file(tmp_path):
    a = FlatParams.from_tensors({"w": torch.randn(3, 2), "h": torch.arange(4, dtype=torch.float16)})
    b = params_from_bytes(params_to_bytes(a), a.spec)
    assert b.spec == a.spec and b.allclose(a, rtol=0, atol=0)
    save_params(a, tmp_path / "p.safetensors", {"round": "3"})
    c = load_params(tmp_path / "p.safetensors", a.spec)
    assert c.allclose(a, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))
    other = ParamSpec([("w", (2, 3), torch.float32), ("h", (4,), torch.float16)])
    with pytest.raises(ValueError, match="expected"):
        load_params(tmp_path / "p.safetensors", other)


def test_isfinite_finds_nan_and_inf_anywhere_and_survives_an_overflowing_sum():
    big = torch.full((3_000_000,), 3e38)  # every value finite, their sum overflows to inf
    assert FlatParams.from_tensors({"w": big}).isfinite()
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = big.clone()
        x[2_500_001] = bad  # past the first block of the fallback scan
        assert not FlatParams.from_tensors({"w": x}).isfinite()
        y = torch.zeros(10, dtype=torch.bfloat16)
        y[3] = bad
        assert not FlatParams.from_tensors({"w": y}).isfinite()
    assert FlatParams.from_tensors({"n": torch.arange(5)}).isfinite()  # integer buffers are always finite
