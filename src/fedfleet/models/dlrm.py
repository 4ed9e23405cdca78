"""DLRM (Naumov et al. 2019), the click-through model of FedScale's Taobao guide, at simulation size.

    dense (B, D) --bottom MLP--> (B, d) --+
    id_k (B,) --embedding table k--> (B, d) --+--> stack (B, n, d) --> T T^T (B, n, n)
                                              upper triangle without the diagonal: n(n-1)/2 dot products
    [bottom output, dot products] --top MLP--> one logit (a click), or num_classes logits

Each sparse feature's table is ``embeddings.<feature>.weight`` (one row per category), so tables can be
named in ``client.keep_local``, e.g. ``embeddings\\.user_id`` keeps each user's row on the user's client.
Only standard layers and no buffers, so the cohort-vectorised runtime can batch it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedfleet.data.features import FeatureLayout
from fedfleet.errors import ConfigError
from fedfleet.models.zoo import MODELS


def _mlp(width: int, layers: Sequence[int], relu_last: bool) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i, units in enumerate(layers):
        modules.append(nn.Linear(width, units))
        if relu_last or i < len(layers) - 1:
            modules.append(nn.ReLU())
        width = units
    return nn.Sequential(*modules)


class DLRM(nn.Module):
    def __init__(
        self,
        features: FeatureLayout,
        outputs: int = 1,
        embedding_dim: int = 16,
        bottom: Sequence[int] = (64,),
        top: Sequence[int] = (64, 32),
    ) -> None:
        super().__init__()
        if not features.sparse:
            raise ConfigError("dlrm needs at least one sparse (categorical) feature to embed")
        bad = [n for n in features.sparse if "." in n or not n]
        if bad:
            raise ConfigError(f"dlrm: sparse feature names {bad} cannot name modules (no '.' allowed)")
        self.num_dense = features.num_dense
        # the bottom MLP ends at embedding_dim so its output can take part in the dot products
        self.bottom = _mlp(self.num_dense, [*bottom, embedding_dim], relu_last=True) if self.num_dense else None
        tables = zip(features.sparse, features.cardinalities, strict=True)
        self.embeddings = nn.ModuleDict({name: nn.Embedding(card, embedding_dim) for name, card in tables})
        for table in self.embeddings.values():
            # DLRM's reference init: U(-1/sqrt(rows), 1/sqrt(rows)); N(0, 1) would make the first dot
            # products ~embedding_dim in size and saturate the top MLP
            bound = 1.0 / math.sqrt(table.num_embeddings)
            nn.init.uniform_(table.weight, -bound, bound)
        self.num_vectors = len(features.sparse) + (1 if self.bottom is not None else 0)
        self.num_interactions = self.num_vectors * (self.num_vectors - 1) // 2
        top_width = (embedding_dim if self.bottom is not None else 0) + self.num_interactions
        self.top = _mlp(top_width, [*top, outputs], relu_last=False)

    def forward(self, x: Tensor) -> Tensor:
        ids = x[:, self.num_dense :].long()  # ids are stored as exact floats in x
        vectors = [self.bottom(x[:, : self.num_dense])] if self.bottom is not None else []
        vectors += [table(ids[:, k]) for k, table in enumerate(self.embeddings.values())]
        stacked = torch.stack(vectors, dim=1)  # (B, n, d)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))  # (B, n, n)
        row, col = torch.triu_indices(self.num_vectors, self.num_vectors, offset=1, device=x.device)
        pairs = dots[:, row, col]  # (B, n(n-1)/2): each pair once, no self-interaction
        top_in = torch.cat([vectors[0], pairs], dim=1) if self.bottom is not None else pairs
        return self.top(top_in)


@MODELS.register("dlrm")
def dlrm(
    input_shape: Sequence[int],
    num_classes: int,
    features: FeatureLayout | None = None,
    embedding_dim: int = 16,
    bottom: Sequence[int] = (64,),
    top: Sequence[int] = (64, 32),
) -> nn.Module:
    """DLRM on a dataset with a feature layout (``movielens_ctr``, a csv with ``sparse:``); two classes give one
    click logit."""
    if features is None:
        raise ConfigError(
            "dlrm needs a dataset that declares dense and sparse (categorical) columns, such as movielens_ctr, or "
            "your own table: {name: csv, path: clicks.csv, sparse: [user_id, item_id], dense: [price]}"
        )
    if tuple(input_shape) != (features.width,):
        raise ConfigError(f"dlrm: inputs of shape {tuple(input_shape)} do not match the {features.width} columns")
    if embedding_dim < 1 or any(u < 1 for u in (*bottom, *top)):
        raise ConfigError("dlrm: embedding_dim and every bottom/top layer width must be >= 1")
    outputs = 1 if num_classes == 2 else num_classes  # one logit + BCE is the CTR standard
    return DLRM(features, outputs, embedding_dim, tuple(bottom), tuple(top))
