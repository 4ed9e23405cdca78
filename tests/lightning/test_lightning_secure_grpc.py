"""FedLightningCallback parties with FedArguments(aggregator="secure") over real gRPC on loopback: the sync driver
masks what rank 0 sends, the model-less arbiter unmasks only the sum, and both parties hold the weighted mean."""

from __future__ import annotations

import threading

from fedfleet.lightning import FedArguments, FedAvgServer, create_context
from tests.grpc_jobs import free_port
from tests.lightning.test_lightning_fed import check_weighted_means, run_parties


def test_lightning_parties_sync_securely_over_grpc():
    parties = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]
    address = f"127.0.0.1:{free_port()}"
    ctxs = [create_context(p, parties, "s-lightning-secure", address, insecure=True) for p in parties]
    server = FedAvgServer(ctxs[2], wait_timeout=120)  # secure because both parties ask for it
    history: dict = {}

    def serve():
        try:
            history["records"] = server.train()
        except BaseException as exc:
            history["error"] = exc

    arbiter = threading.Thread(target=serve, daemon=True)
    arbiter.start()
    try:
        runs = run_parties(ctxs[:2], FedArguments("step", 4, aggregator="secure"), epochs=1)
    finally:
        arbiter.join(60)
        if arbiter.is_alive():  # a failed party must not leave the server running
            server.arbiter.server.stop(grace=0.5)
            arbiter.join(10)
    assert "error" not in history, history.get("error")
    records = history["records"]
    assert len(records) == 3  # 10 and 9 steps, a sync every 4 and at the end
    assert all(r.metrics["secagg_masked"] == 2.0 and r.metrics["secagg_mean_bound"] < 1e-6 for r in records)
    check_weighted_means(runs, syncs=3)
