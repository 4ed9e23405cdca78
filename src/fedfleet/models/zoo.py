"""Small models for simulation, built from shapes (no downloads). Register your own with ``@MODELS.register``.

Only standard layers, no BatchNorm or dropout: these models work with ``torch.func`` (cohort
vectorisation) and give the same result on every run with the same seed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from math import prod
from typing import Any

from torch import nn

from fedfleet.errors import ConfigError
from fedfleet.registry import Registry, construct

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


@MODELS.register("simple_cnn")
def simple_cnn(input_shape: Sequence[int], num_classes: int, padding: int = 0, hidden: int = 512) -> nn.Module:
    """pfl-research's simple CNN: two 3x3 conv + 2x2 max-pool blocks (32, 64 channels), a 512-unit dense layer.

    With ``padding: 0`` (pfl's CIFAR10 shape) 32x32 -> 30 -> 15 -> 13 -> 6; 8x8 digits need ``padding: 1``.
    """
    if len(input_shape) != 3:
        raise ConfigError(
            f"simple_cnn takes images (channels, height, width), not inputs of shape {tuple(input_shape)}"
        )
    channels, height, width = input_shape
    for _ in range(2):  # conv 3x3 then pool 2x2
        height, width = (height + 2 * padding - 2) // 2, (width + 2 * padding - 2) // 2
    if height < 1 or width < 1:
        raise ConfigError(
            f"simple_cnn: inputs of {tuple(input_shape)} are too small for padding {padding}; use padding: 1"
        )
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * height * width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@MODELS.register("mlp")
def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200, 200)) -> nn.Module:
    """A multi-layer perceptron on the flattened input (ReLU between layers)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(input_shape)
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("logistic_regression")
def logistic_regression(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, features: Any = None, **params: Any
) -> nn.Module:
    """``features``: the dataset's column layout (``Dataset.features``), given to factories that take a
    ``features`` argument (DLRM); others (an MLP on the same columns) just see numbers."""
    factory = MODELS.get(name)
    takes_layout = features is not None and "features" in inspect.signature(factory).parameters
    layout = {"features": features} if takes_layout else {}
    return construct(
        lambda **kw: factory(tuple(input_shape), num_classes, **layout, **kw),
        params,
        f"model {name!r}",
        signature_of=factory,
        skip=2,
    )
