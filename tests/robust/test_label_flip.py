"""Label flipping: the attackers' rows of the federation are flipped once, so they train honestly on wrong labels."""

import pytest
import torch

from fedfleet.attacks import LabelFlip
from fedfleet.config import load_job
from fedfleet.data import FederatedDataset
from fedfleet.errors import ConfigError
from fedfleet.jobs.deploy import Access, build_arbiter
from fedfleet.jobs.simulation import Simulation
from tests.grpc_jobs import write_job


def test_only_the_attackers_rows_are_flipped_and_by_the_rule():
    y = torch.arange(10).repeat(4)  # 40 rows, 4 clients of 10: every class once per client
    fed = FederatedDataset(torch.zeros(40, 1), y.clone(), torch.tensor([0, 10, 20, 30, 40]), 10)
    attack = LabelFlip(fraction=0.5).for_population(4, seed=0)
    assert attack.poison(fed) == 2
    for c in range(4):
        rows = fed.client(c).y
        want = 9 - torch.arange(10) if attack.attacks(c) else torch.arange(10)
        assert torch.equal(rows, want)
    shifted = FederatedDataset(torch.zeros(10, 1), torch.arange(10), torch.tensor([0, 10]), 10)
    LabelFlip(fraction=1.0, shift=3).for_population(1, 0).poison(shifted)
    assert torch.equal(shifted.y, (torch.arange(10) + 3) % 10)


def test_a_federation_of_label_flippers_learns_the_flipped_mapping(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: flip\nrounds: 6\ncohort: 10\neval_every: 6\ndata: {dataset: digits, clients: 20}\n"
        "model: {name: mlp}\nclient: {epochs: 2, batch_size: 10, lr: 0.3}\n"
        f"output: {{dir: {tmp_path}}}\ntransforms: {{client: [{{name: label_flip, fraction: 1.0}}]}}\n"
    )
    history = Simulation.from_config(load_job(path)).loop.run()
    assert history[-1].metrics["test_accuracy"] < 0.05  # it predicts 9 - c, almost never c
    assert history[-1].metrics["train_attacker"] == 1.0


def test_a_deployed_job_refuses_it(tmp_path):
    job = load_job(write_job(tmp_path, "transforms: {client: [{name: label_flip, fraction: 0.3}]}\n"), [])
    with pytest.raises(ConfigError, match="poisons simulated clients' data"):
        build_arbiter(job, Access(True, None, job.network.address))


def test_a_regression_target_cannot_be_flipped():
    fed = FederatedDataset(torch.zeros(4, 1), torch.rand(4), torch.tensor([0, 4]), 1)
    with pytest.raises(ValueError, match="needs class labels"):
        LabelFlip(fraction=1.0).for_population(1, 0).poison(fed)
