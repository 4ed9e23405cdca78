"""FedAvgClient / FedAvgServer: the Hugging Face Trainer syncing through fedfleet (in-process and gRPC)."""

import dataclasses
import threading

import pytest
import torch
from safetensors.torch import load_file

from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, FedAvgClient, FedAvgServer, LocalFederation, create_context
from tests.grpc_jobs import free_port
from tests.hf_parties import make_client, review_shares, tiny_gpt2


def test_fed_arguments_schedule_and_errors():
    assert FedArguments("epoch", 1).sync_steps(24, 12) == (12, 24)
    assert FedArguments("epoch", 2).sync_steps(36, 12) == (24, 36)  # epochs 2 and 3 (the end)
    assert FedArguments("step", 5).sync_steps(24, 12) == (5, 10, 15, 20, 24)
    assert FedArguments("step", 0.25).sync_steps(24, 12) == (6, 12, 18, 24)
    assert FedArguments("step", 0.25).sync_steps(18, 9) == (5, 9, 14, 18)  # four, as documented (not 5)
    assert FedArguments("step", 0.3).sync_steps(100, 9) == (30, 60, 90, 100)
    assert FedArguments("step", 0.25).sync_steps(2, 2) == (1, 2)  # never more syncs than steps
    assert FedArguments("step", 5).sync_steps(24, 12, start=12) == (15, 20, 24)  # a resumed run
    assert FedArguments(aggregator="secure_aggregate") == FedArguments(aggregator="secure")  # FATE-LLM's name
    with pytest.raises(ConfigError, match="aggregator must be 'plain' or 'secure'"):
        FedArguments(aggregator="homomorphic")
    with pytest.raises(ConfigError, match="fraction"):
        FedArguments("epoch", 0.5)
    with pytest.raises(ConfigError, match="positive"):
        FedArguments("step", 0)


def run_pair(ctxs, csvs, fed_args, tmp_path, models=None):
    clients = [
        make_client(ctx, csv, seed, fed_args, tmp_path / f"p{seed}", model=None if models is None else models[seed])
        for seed, (ctx, csv) in enumerate(zip(ctxs, csvs, strict=True))
    ]
    errors = []

    def train(client):
        try:
            client.train()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(c,)) for c, _, _ in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    return clients


def check_weighted_means(clients, syncs):
    (a, a_before, a_after), (b, b_before, b_after) = clients
    assert a_after.snapshots[0].allclose(b_after.snapshots[0], rtol=0, atol=0)  # a common start
    assert len(a_before.snapshots) == len(b_before.snapshots) == syncs
    assert a.fed_sync.syncs == b.fed_sync.syncs == syncs
    for r in range(syncs):
        wa, wb = a.fed_sync.weights[r], b.fed_sync.weights[r]
        expected = a_before.snapshots[r].clone().mul_(wa / (wa + wb)).add_(b_before.snapshots[r], alpha=wb / (wa + wb))
        assert not a_before.snapshots[r].allclose(b_before.snapshots[r])  # they trained apart
        for after in (a_after, b_after):
            assert after.snapshots[r + 1].allclose(expected, rtol=0, atol=2e-6), f"sync {r + 1}"
        assert a_after.snapshots[r + 1].allclose(b_after.snapshots[r + 1], rtol=0, atol=0)


def test_in_process_epoch_syncs_give_every_party_the_weighted_mean(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=80)
    fed = LocalFederation(2)
    clients = run_pair([fed.context(0), fed.context(1)], csvs, FedArguments("epoch", 1), tmp_path)
    check_weighted_means(clients, syncs=2)
    (a, *_), (b, *_) = clients
    assert a.fed_sync.weights == b.fed_sync.weights == [40.0, 40.0]  # examples per epoch, counted as trained


@pytest.mark.parametrize("lora", [False, True])
def test_grpc_step_syncs_with_a_model_less_arbiter(tmp_path, lora):
    csvs = review_shares(tmp_path / "data", 2, reviews=80)
    parties = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]
    address = f"127.0.0.1:{free_port()}"
    ctxs = [create_context(p, parties, "s-hf", address, insecure=True) for p in parties]
    server = FedAvgServer(ctxs[2])
    history = {}
    arbiter = threading.Thread(target=lambda: history.setdefault("records", server.train()), daemon=True)
    arbiter.start()
    models = None
    if lora:
        from peft import LoraConfig, get_peft_model

        models = [get_peft_model(tiny_gpt2(s), LoraConfig(r=4, target_modules=["c_attn"])) for s in (0, 1)]
    clients = run_pair(ctxs[:2], csvs, FedArguments("step", 2), tmp_path, models=models)
    arbiter.join(30)
    check_weighted_means(clients, syncs=5)  # 2 epochs of 5 steps (40 examples, batch 8), a sync every 2 steps
    assert len(history["records"]) == 5
    spec = server.arbiter.server.spec
    model = clients[0][0].model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert spec.names == list(trainable)
    assert spec.nbytes == sum(p.numel() * p.element_size() for p in trainable.values())
    if lora:  # only the adapters travel: a few KB of the model's MBs
        assert all("lora_" in n for n in spec.names)
        assert spec.nbytes < 0.02 * sum(p.numel() * 4 for p in model.parameters())
    # FATE's FedAVGServer.save_model: what the arbiter folded, by name, loadable into a party's model
    saved = load_file(str(server.save_model(tmp_path / "server")))
    assert sorted(saved) == sorted(trainable)
    for name, tensor in saved.items():
        assert torch.equal(tensor, trainable[name].detach().cpu())  # the parties ended at the final aggregate


def test_bad_input_is_named_before_training(tmp_path):
    csvs = review_shares(tmp_path / "data", 1, reviews=16)
    fed = LocalFederation(1)
    model = tiny_gpt2(0)
    for p in model.parameters():
        p.requires_grad_(False)
    client, *_ = make_client(fed.context(0), csvs[0], 0, FedArguments(), tmp_path / "frozen", model=model)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        client.train()
    from fedfleet.errors import DataError

    small = tiny_gpt2(0)
    small.resize_token_embeddings(1000)
    with pytest.raises(DataError, match="50257 tokens"):
        make_client(fed.context(0), csvs[0], 0, FedArguments(), tmp_path / "vocab", model=small)
    with pytest.raises(ConfigError, match="arbiter"):
        FedAvgClient(
            ctx=create_context(("arbiter", 1), [("guest", 2), ("arbiter", 1)], "s"), model=small, train_set=[1]
        )


def test_an_unreachable_arbiter_is_a_clear_error(tmp_path):
    csvs = review_shares(tmp_path / "data", 1, reviews=16)
    ctx = create_context(("guest", 1), [("guest", 1), ("arbiter", 2)], "s", f"127.0.0.1:{free_port()}", insecure=True)
    ctx = dataclasses.replace(ctx, connect_attempts=2, reconnect_max_s=0.2)
    client, *_ = make_client(ctx, csvs[0], 0, FedArguments(), tmp_path / "x")
    with pytest.raises(ConnectionError, match="cannot reach the arbiter"):
        client.train()
