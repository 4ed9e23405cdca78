"""The DLRM of FedScale's Taobao guide (its utils/models/recommendation/dlrm.py), registered for fedfleet.

In FedScale the guide edits ``fllibs.init_model()`` to build it; here this module registers it by name and
``taobao_conf.yml`` names the module (``imports: [taobao_models]``) and the model (``model: {name: taobao_dlrm}``).
Two things change from the guide's class, both because fedfleet hands every model one input tensor:

- ``forward(x)`` takes one float tensor: the dense columns first, then one category id per sparse column (ids
  travel as exact floats), in the order of the dataset's ``FeatureLayout``, which the factory receives;
- it returns the click logit, without the guide's final sigmoid: fedfleet's loss for one output is BCE on logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedfleet.data import FeatureLayout
from fedfleet.models import MODELS


def mlp(width: int, units: Sequence[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, out in enumerate(units):
        layers.append(nn.Linear(width, out))
        if relu_last or i < len(units) - 1:
            layers.append(nn.ReLU())
        width = out
    return nn.Sequential(*layers)


class TaobaoDLRM(nn.Module):
    def __init__(
        self, features: FeatureLayout, sparse_feature_dim: int, bot_layer_sizes: list[int], top_layer_sizes: list[int]
    ) -> None:
        super().__init__()
        if bot_layer_sizes[-1] != sparse_feature_dim:
            raise ValueError(f"bot_layer_sizes must end at sparse_feature_dim ({sparse_feature_dim})")
        self.num_dense = features.num_dense
        self.bot_mlp = mlp(features.num_dense, bot_layer_sizes, relu_last=True)
        # one table per sparse column, named after it: client.keep_local can keep embeddings\.userid on its client
        tables = zip(features.sparse, features.cardinalities, strict=True)
        self.embeddings = nn.ModuleDict({name: nn.Embedding(rows, sparse_feature_dim) for name, rows in tables})
        self.num_vectors = len(features.sparse) + 1  # the guide's num_field embeddings and the bottom MLP's output
        pairs = self.num_vectors * (self.num_vectors - 1) // 2
        self.top_mlp = mlp(pairs + sparse_feature_dim, top_layer_sizes, relu_last=False)

    def forward(self, x: Tensor) -> Tensor:
        dense, ids = x[:, : self.num_dense], x[:, self.num_dense :].long()
        bottom = self.bot_mlp(dense)  # (B, d)
        vectors = [table(ids[:, k]) for k, table in enumerate(self.embeddings.values())]
        stacked = torch.stack([*vectors, bottom], dim=1)  # (B, n, d)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))  # (B, n, n)
        row, col = torch.triu_indices(self.num_vectors, self.num_vectors, offset=1, device=x.device)
        return self.top_mlp(torch.cat([bottom, dots[:, row, col]], dim=1))  # (B, 1): the click logit


@MODELS.register("taobao_dlrm")
def taobao_dlrm(
    input_shape: Sequence[int],
    num_classes: int,
    features: FeatureLayout,
    sparse_feature_dim: int = 16,
    bot_layer_sizes: Sequence[int] = (64, 16),
    top_layer_sizes: Sequence[int] = (512, 256, 1),
) -> nn.Module:
    """fedfleet calls it with the input shape, the number of classes, the dataset's column layout (``features``,
    because the factory takes that argument) and the keys of the job's ``model:`` section."""
    return TaobaoDLRM(features, sparse_feature_dim, list(bot_layer_sizes), list(top_layer_sizes))
