"""FedArguments(aggregator="secure") between a model-less arbiter and Hugging Face Trainer parties over real gRPC
(mutual TLS on loopback): after every sync both parties hold the weighted mean of what they trained, to the
quantisation bound, and the arbiter only ever received masked inputs of the exchanged params (LoRA adapters)."""

import threading

from peft import LoraConfig, get_peft_model

from fedfleet.hf import FedArguments, FedAvgServer, create_context
from fedfleet.runtime.grpc.arbiter import EventKind
from fedfleet.runtime.grpc.secure_wire import MASKED_NAME
from tests.grpc_jobs import free_port, make_certs
from tests.hf.test_hf_fedavg import check_weighted_means
from tests.hf.test_hf_local_federation import train_all
from tests.hf_parties import make_client, review_shares, tiny_gpt2

PARTIES = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]


def test_hf_parties_sync_securely_over_grpc_and_hold_the_weighted_mean(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=80)
    make_certs(tmp_path / "certs", ["guest-9999", "host-10000"])
    address = f"127.0.0.1:{free_port()}"
    ctxs = [create_context(p, PARTIES, "s-hf-secure", address, certs=str(tmp_path / "certs")) for p in PARTIES]
    server = FedAvgServer(ctxs[2], wait_timeout=120)  # no fed_args: secure because both parties ask for it
    received = []
    events = server.arbiter.server.events
    put = events.put

    def record(event, *args, **kwargs):
        if event.kind == EventKind.UPDATE and event.round >= 0:  # round -1: the first party's initial adapters
            received.append((event.party, event.params.spec.names, event.params.numel))
        put(event, *args, **kwargs)

    events.put = record
    history: dict = {}

    def serve():
        try:
            history["records"] = server.train()
        except BaseException as exc:
            history["error"] = exc

    arbiter = threading.Thread(target=serve, daemon=True)
    arbiter.start()
    try:
        models = [get_peft_model(tiny_gpt2(s), LoraConfig(r=4, target_modules=["c_attn"])) for s in (0, 1)]
        fed_args = [FedArguments("step", 2, "secure"), FedArguments("step", 2, "secure_aggregate")]  # FATE's name
        clients = [make_client(ctxs[i], csvs[i], i, fed_args[i], tmp_path / f"p{i}", model=models[i]) for i in range(2)]
        errors = train_all([client for client, _, _ in clients], join_s=240)
    finally:
        arbiter.join(60)
        if arbiter.is_alive():  # a failed party must not leave the server running
            server.arbiter.server.stop(grace=0.5)
            arbiter.join(10)
    assert errors == [None, None], errors
    assert "error" not in history, history.get("error")
    records = history["records"]
    assert len(records) == 5  # 2 epochs of 5 steps (40 examples, batch 8), a sync every 2 steps
    for record in records:
        m = record.metrics
        assert (m["secagg_advertised"], m["secagg_masked"], m["secagg_unmasked"]) == (2.0, 2.0, 2.0)
        assert m["secagg_mean_bound"] < 1e-6  # 31 bits for two parties: far below the test's 2e-6
    check_weighted_means(clients, syncs=5)
    adapters = sum(p.numel() for n, p in clients[0][0].model.named_parameters() if p.requires_grad)
    assert sorted(name for name, _, _ in received) == sorted(["guest-9999", "host-10000"] * 5)
    assert all(names == [MASKED_NAME] and numel == adapters + 1 for _, names, numel in received)
