"""Torch threads of a Hugging Face party on a CPU (issue 14 item 16): one for a small model, as the simulation
trains; a share of the cores when in-process parties train at once; whatever the user says otherwise."""

import threading

import pytest
import torch
from transformers import TrainerCallback

from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, LocalFederation
from fedfleet.sync.threads import ONE_THREAD_BELOW, PartyThreads, choose_threads, parties_at_once
from tests.hf.test_hf_local_federation import train_all
from tests.hf_parties import make_client, review_shares

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_rule_is_the_simulation_s(monkeypatch):
    from fedfleet.jobs.assemble import ONE_THREAD_BELOW as simulation

    assert simulation == ONE_THREAD_BELOW  # one threshold, measured once (benchmarks/threads.py)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert choose_threads(3_000_000, CPU) == 1  # small: one thread, alone or beside others
    assert choose_threads(3_000_000, CPU, at_once=2) == 1
    assert choose_threads(50_000_000, CPU) is None  # a large model trained alone keeps torch's threads
    assert choose_threads(50_000_000, CPU, at_once=2) == 4  # parties at once share the cores
    assert choose_threads(50_000_000, CPU, at_once=16) == 1
    assert choose_threads(3_000_000, CUDA) is None  # a GPU's work is not torch's CPU threads
    assert choose_threads(3_000_000, CPU, threads=3) == 3  # the user's word wins
    assert choose_threads(50_000_000, CUDA, threads=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(3_000_000, CPU) is None  # so does OMP_NUM_THREADS
    with pytest.raises(ConfigError, match="threads=0: give a positive number"):
        choose_threads(3_000_000, CPU, threads=0)


def test_parties_at_once_counts_in_process_parties_that_overlap():
    assert parties_at_once(LocalFederation(3).context(0)) == 1  # they take turns
    assert parties_at_once(LocalFederation(3, reproducible=False).context(0)) == 3
    assert parties_at_once(object()) == 1  # a gRPC party: its own process


def test_threads_are_restored_when_the_last_party_leaves():
    before = torch.get_num_threads()
    inside = []

    def party(count):
        with PartyThreads(count, "p"):
            inside.append(torch.get_num_threads())

    outer = PartyThreads(1, "outer")
    with outer:
        assert torch.get_num_threads() == 1
        t = threading.Thread(target=party, args=(1,))
        t.start()
        t.join()
        assert torch.get_num_threads() == 1  # the other party left; this one still trains with 1
    outer.__exit__(None, None, None)  # a second exit (Lightning ends through several hooks) does nothing
    assert inside == [1]
    assert torch.get_num_threads() == before
    with PartyThreads(None, "p"):
        assert torch.get_num_threads() == before


class ThreadsSeen(TrainerCallback):
    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, **kw):
        self.seen.add(torch.get_num_threads())


def run_pair(tmp_path, monkeypatch, **threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2, timeout=60)
    clients, seen = [], []
    for i in range(2):
        client, *_ = make_client(fed.context(i), csvs[i], i, FedArguments("epoch", 1), tmp_path / f"p{i}", 1, **threads)
        seen.append(ThreadsSeen())
        client.add_callback(seen[-1])
        clients.append(client)
    assert train_all(clients) == [None, None]
    return [s.seen for s in seen]


def test_a_small_model_trains_with_one_thread_and_the_process_gets_its_own_back(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    assert run_pair(tmp_path, monkeypatch) == [{1}, {1}]  # a 1.6M-param GPT-2: one thread each
    assert torch.get_num_threads() == 2


def test_threads_given_to_the_party_win(tmp_path, monkeypatch):
    assert run_pair(tmp_path, monkeypatch, threads=2) == [{2}, {2}]
