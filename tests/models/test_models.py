import pytest
import torch
from torch import nn

from fedfleet.errors import ConfigError
from fedfleet.models import MODELS, build_model


@pytest.mark.parametrize("name", ["simple_cnn", "mlp", "logistic_regression"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_output_is_batch_by_classes(name, shape):
    params = {"padding": 1} if name == "simple_cnn" else {}
    model = build_model(name, shape, 10, **params)
    assert model(torch.zeros(4, *shape)).shape == (4, 10)


def test_simple_cnn_has_pfl_research_parameter_count_on_cifar():
    model = build_model("simple_cnn", (3, 32, 32), 10)
    conv1 = 3 * 32 * 9 + 32
    conv2 = 32 * 64 * 9 + 64
    dense = 64 * 6 * 6 * 512 + 512
    head = 512 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == conv1 + conv2 + dense + head


def test_errors_for_unknown_kwargs_and_small_inputs():
    with pytest.raises(ConfigError, match=r"unknown key 'paddin'.*did you mean 'padding'"):
        build_model("simple_cnn", (1, 8, 8), 10, paddin=1)
    with pytest.raises(ConfigError, match="too small for padding 0; use padding: 1"):
        build_model("simple_cnn", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        build_model("resnet", (1, 8, 8), 10)


def test_users_register_their_own():
    @MODELS.register("tiny_test_model")
    def tiny(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    assert build_model("tiny_test_model", (1, 8, 8), 3)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
