"""The same Hugging Face job with FedYogi in-process and over gRPC: one loop, one result."""

import dataclasses
import threading

from fedfleet.hf import FedArguments, FedAvgServer, LocalFederation, create_context
from fedfleet.sync.turns import Turn
from fedfleet.transforms import ClipNorm
from tests.grpc_jobs import free_port
from tests.hf.test_hf_local_federation import train_all
from tests.hf_parties import make_client, review_shares, tiny_gpt2


@dataclasses.dataclass
class TakingTurns:
    """A gRPC party's context whose parties, threads of this test, take turns as in-process parties do, so
    dropout draws and data order are each party's own (as in a process of its own) and the runs compare."""

    ctx: object
    floor: threading.Lock

    def __getattr__(self, name):
        return getattr(self.ctx, name)

    def turn(self, seed):
        return Turn(self.floor, seed)


def train_pair(ctxs, csvs, tmp_path, tag):
    # one initial model for both, so the session's start does not depend on who joins first
    pairs = [
        make_client(ctx, csv, i, FedArguments("step", 2), tmp_path / f"{tag}{i}", epochs=1, model=tiny_gpt2(0))
        for i, (ctx, csv) in enumerate(zip(ctxs, csvs, strict=True))
    ]
    assert train_all([c for c, _, _ in pairs]) == [None, None]
    return [after.snapshots[-1] for _, _, after in pairs]


def test_fedyogi_in_process_equals_fedyogi_over_grpc(tmp_path):
    csvs = review_shares(tmp_path / "data", 2, reviews=64)
    fed = LocalFederation(2, strategy="fedyogi")
    local = train_pair([fed.context(0), fed.context(1)], csvs, tmp_path, "local")
    assert fed.rounds == 2

    parties = [("guest", "1"), ("host", "2"), ("arbiter", "3")]
    address = f"127.0.0.1:{free_port()}"
    ctxs = [create_context(p, parties, "s-yogi", address, insecure=True) for p in parties]
    server = FedAvgServer(ctxs[2], strategy="fedyogi")
    records = []
    arbiter = threading.Thread(target=lambda: records.extend(server.train()), daemon=True)
    arbiter.start()
    floor = threading.Lock()
    grpc = train_pair([TakingTurns(c, floor) for c in ctxs[:2]], csvs, tmp_path, "grpc")
    arbiter.join(30)
    assert len(records) == 2
    for party in (0, 1):
        assert grpc[party].allclose(local[party], rtol=1e-5, atol=1e-6)

    fedavg = LocalFederation(2)
    plain = train_pair([fedavg.context(0), fedavg.context(1)], csvs, tmp_path, "avg")
    assert not plain[0].allclose(local[0], rtol=0, atol=1e-4)  # FedYogi's server step made a difference


def test_a_partys_update_transforms_clip_what_it_sends(tmp_path):
    """FedAvgClient(update_transforms=[ClipNorm]): each party's delta is clipped before the fold, so the global
    model moves at most max_norm per sync."""
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2)
    clip = [ClipNorm(max_norm=0.01)]
    pairs = [
        make_client(fed.context(i), csvs[i], i, FedArguments("step", 2), tmp_path / f"c{i}", epochs=1,
                    model=tiny_gpt2(0), update_transforms=clip)
        for i in range(2)
    ]  # fmt: skip
    assert train_all([c for c, _, _ in pairs]) == [None, None]
    start, end = pairs[0][2].snapshots[0], pairs[0][2].snapshots[-1]
    assert 0 < end.sub(start).sq_norm() ** 0.5 <= fed.rounds * 0.01 + 1e-6
