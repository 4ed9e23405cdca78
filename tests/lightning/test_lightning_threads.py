"""Torch threads of a Lightning party on a CPU (issue 14 item 16): the simulation's rule, as for HF parties."""

import lightning.pytorch as pl
import pytest
import torch

from fedfleet.errors import ConfigError
from fedfleet.lightning import FedArguments, FedLightningCallback, LocalFederation
from tests.lightning.test_lightning_fed import fit_side_by_side
from tests.lightning_parties import DigitsData, DigitsMLP, make_trainer


class ThreadsSeen(pl.Callback):
    def __init__(self):
        self.seen = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.add(torch.get_num_threads())


def parties(fed, **kwargs):
    runs, seen = [], []
    for i in range(fed.size):
        callback = FedLightningCallback(fed.context(i), FedArguments("epoch", 1), **kwargs)
        seen.append(ThreadsSeen())
        trainer, *_ = make_trainer(callback, 1, callbacks=[seen[-1]])
        runs.append((trainer, DigitsMLP(seed=0), DigitsData(i, fed.size, 32, limit=96, seed=0)))
    return runs, seen


def test_a_small_module_trains_with_one_thread_and_the_process_gets_its_own_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    runs, seen = parties(LocalFederation(2))
    fit_side_by_side(runs)
    assert [s.seen for s in seen] == [{1}, {1}]  # a 5K-param MLP
    runs, seen = parties(LocalFederation(1))
    runs[0][0].fit(*runs[0][1:])  # in this thread, as a party of its own process trains
    assert seen[0].seen == {1}
    assert torch.get_num_threads() == 2


def test_threads_given_to_the_callback_win(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runs, seen = parties(LocalFederation(2), threads=2)
    fit_side_by_side(runs)
    assert [s.seen for s in seen] == [{2}, {2}]
    with pytest.raises(ConfigError, match="threads=-1"):
        FedLightningCallback(LocalFederation(1).context(0), threads=-1)
