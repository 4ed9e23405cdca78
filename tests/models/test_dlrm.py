"""DLRM by hand, the one-logit loss and metrics, and params kept on the clients (keep_local)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.client.tasks import OutputLoss, output_kind, roc_auc
from fedfleet.core.fit_config import FitConfig
from fedfleet.data import FeatureLayout, federate, from_tensors
from fedfleet.errors import ConfigError, DataError
from fedfleet.models import DLRM, build_model
from fedfleet.runtime.sim import make_runtime

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = FeatureLayout(("a", "b", "c"), ("user", "item"), (5, 7))


def ctr_data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 dense columns, a user id (0-4) and an item id (0-6); users 0-1 and even items click more."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, 3, generator=gen)
    user = torch.randint(0, 5, (n,), generator=gen)
    item = torch.randint(0, 7, (n,), generator=gen)
    logit = 2.0 * (user < 2).float() + 2.0 * (item % 2 == 0).float() - 2.0 + dense[:, 0]
    y = (torch.rand(n, generator=gen) < torch.sigmoid(logit)).long()
    return torch.cat([dense, user[:, None].float(), item[:, None].float()], dim=1), y


def dlrm(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model("dlrm", (5,), 2, features=LAYOUT, embedding_dim=4, **kw)


def test_shapes_and_interaction_count_by_hand():
    model = dlrm(bottom=[8], top=[6])
    assert isinstance(model, DLRM)
    # vectors: bottom output + 2 embeddings = 3 -> 3 * 2 / 2 = 3 dot products, next to the 4-wide bottom output
    assert model.num_interactions == 3
    assert model.top[0].in_features == 4 + 3
    assert model.bottom[0].in_features == 3 and model.bottom[-2].out_features == 4
    assert model.embeddings["user"].weight.shape == (5, 4) and model.embeddings["item"].weight.shape == (7, 4)
    x, _ = ctr_data(6)
    assert model(x).shape == (6, 1)  # one click logit for two classes
    assert build_model("dlrm", (5,), 3, features=LAYOUT)(x).shape == (6, 3)
    only_sparse = FeatureLayout((), ("u", "i", "g"), (2, 3, 4))
    no_dense = build_model("dlrm", (3,), 2, features=only_sparse, embedding_dim=4, top=[6])
    assert no_dense.bottom is None and no_dense.num_interactions == 3 and no_dense.top[0].in_features == 3


def test_interactions_are_the_pairwise_dot_products_without_self_terms():
    model = dlrm()
    x, _ = ctr_data(4)
    seen = {}
    model.top.register_forward_pre_hook(lambda m, args: seen.setdefault("top_in", args[0]))
    model(x)
    z = model.bottom(x[:, :3])
    u = model.embeddings["user"](x[:, 3].long())
    i = model.embeddings["item"](x[:, 4].long())
    pairs = torch.stack([(z * u).sum(1), (z * i).sum(1), (u * i).sum(1)], dim=1)
    assert torch.allclose(seen["top_in"], torch.cat([z, pairs], dim=1), atol=1e-6)


def test_gradient_reaches_only_the_embedding_rows_in_the_batch():
    model = dlrm()
    x, y = ctr_data(8)
    OutputLoss()(model(x), y).backward()
    grad = model.embeddings["user"].weight.grad
    used = set(x[:, 3].long().tolist())
    for row in range(5):
        assert (grad[row].abs().sum() > 0) == (row in used), row
    assert model.bottom[0].weight.grad.abs().sum() > 0


def test_needs_a_feature_layout_and_other_models_ignore_it():
    with pytest.raises(ConfigError, match="dataset that declares dense and sparse"):
        build_model("dlrm", (5,), 2)
    with pytest.raises(ConfigError, match="do not match the 5 columns"):
        build_model("dlrm", (6,), 2, features=LAYOUT)
    assert build_model("mlp", (5,), 2, features=LAYOUT, hidden=[4])(torch.zeros(2, 5)).shape == (2, 2)
    with pytest.raises(DataError, match="category ids"):
        LAYOUT.check(torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0]]))  # user id 5 of 5 categories


def test_trains_with_the_torch_trainer_on_flat_buffers():
    x, y = ctr_data()
    trainer = TorchTrainer(dlrm())
    table = trainer.model.embeddings["item"].weight
    flat = trainer.params.buffers[torch.float32]
    assert table.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # a view, not a copy
    assert "embeddings.item.weight" in trainer.params.spec
    data = from_tensors(x, y)
    params = trainer.params.clone()
    before = trainer.evaluate(params, data)
    for r in range(15):
        params.add_(trainer.fit(params, FitConfig(round=r, seed=r, batch_size=16, lr=0.5), data).params)
    after = trainer.evaluate(params, data)
    assert after["loss"] < before["loss"] - 0.05 and after["auc"] > 0.75


def test_vectorised_cohort_matches_the_sequential_runtime():
    x, y = ctr_data()
    federation = federate(from_tensors(x, y), clients=4, scheme="iid")
    trainer = TorchTrainer(dlrm())
    start = trainer.params.clone()
    config = FitConfig(batch_size=16, lr=0.3)
    runtimes = [make_runtime(trainer, federation, vectorize=v) for v in ("on", "off")]
    deltas = [[u.params.clone() for u in rt.fit(start, [0, 2, 3], config)] for rt in runtimes]
    for vec, seq in zip(*deltas, strict=True):
        assert vec.allclose(seq, atol=1e-6)


def test_output_kind_picks_the_loss():
    logits, y = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    assert output_kind(logits, y) == "classes"
    assert torch.allclose(OutputLoss()(logits, y), nn.functional.cross_entropy(logits, y))
    one, clicks = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    assert output_kind(one, clicks) == "logit"
    expected = nn.functional.binary_cross_entropy_with_logits(one[:, 0], clicks.float())
    assert torch.allclose(OutputLoss()(one, clicks), expected)
    assert OutputLoss(reduction="none")(one, clicks).shape == (6,)


def test_auc_is_sklearns_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    scores = np.round(rng.normal(size=2000) + labels, 1)  # rounded: many tied scores
    assert len(np.unique(scores)) < 200
    assert roc_auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )
    assert roc_auc(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([0, 1, 1])) == 0.5  # all tied
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])) is None  # one class: undefined


def test_evaluate_reports_auc_and_log_loss_for_one_logit():
    x, y = ctr_data(50)
    trainer = TorchTrainer(dlrm(), eval_batch_size=16)  # several batches: AUC must see them all at once
    metrics = trainer.evaluate(trainer.params.clone(), from_tensors(x, y))
    with torch.no_grad():
        p = torch.sigmoid(trainer.model(x)[:, 0]).double().numpy()
    assert metrics["auc"] == pytest.approx(roc_auc_score(y.numpy(), p), abs=1e-9)
    assert metrics["log_loss"] == pytest.approx(log_loss(y.numpy(), p), rel=1e-6)
    assert metrics["loss"] == pytest.approx(metrics["log_loss"], rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float(((p > 0.5) == y.numpy()).mean()))


def test_keep_local_tables_stay_on_each_client_across_rounds():
    x, y = ctr_data()
    federation = federate(from_tensors(x, y, keys=x[:, 3].long().numpy()), scheme="natural", clients=None)
    trainer = TorchTrainer(dlrm(), keep_local=[r"embeddings\.user"])
    assert "embeddings.user.weight" not in trainer.params.spec  # never exchanged
    assert "embeddings.item.weight" in trainer.params.spec
    table = trainer.model.embeddings["user"].weight
    initial = table.detach().clone()
    params = trainer.params.clone()
    config = FitConfig(batch_size=16, lr=0.5)
    update = trainer.fit(params, config, federation.client(2))  # client 2 is user 2: it touches row 2 only
    assert update.metrics["local_rows"] == 1
    assert torch.equal(table.detach(), initial)  # restored for the next client
    (index, row), *_ = trainer.local.rows[2].values()
    assert index.tolist() == [2] and not torch.equal(row[0], initial[2])
    trainer.fit(params, config, federation.client(3))
    assert sorted(trainer.local.rows) == [2, 3] and trainer.local.stored_rows == 2  # O(rows touched)
    # client 2 resumes from its own row, not from the initial one
    seen = []
    trainer.model.embeddings["user"].register_forward_hook(lambda m, i, o: seen.append(m.weight[2].detach().clone()))
    trainer.fit(params, config, federation.client(2))
    assert torch.equal(seen[0], row[0])


def test_keep_local_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"'embeddings\\\\.usr' matches no parameter"):
        TorchTrainer(dlrm(), keep_local=[r"embeddings\.usr"])
    with pytest.raises(ConfigError, match="nothing would be shared"):
        TorchTrainer(dlrm(), keep_local=["."])
