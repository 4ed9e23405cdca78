"""One loop for party-paced federations: every registered strategy gives the same model in-process
(``LocalFederation``) and over real gRPC (``FedAvgServer``) for the same parties and seed."""

import threading

import pytest
import torch
from torch import nn

from fedfleet.core.params import FlatParams, bind_module
from fedfleet.core.update import TrainStats
from fedfleet.strategy import STRATEGIES
from fedfleet.sync import FedAvgServer, LocalFederation, create_context
from fedfleet.transforms import build_pipeline
from tests.grpc_jobs import free_port

PARTIES = [("guest", "1"), ("host", "2"), ("arbiter", "3")]
ROUNDS = 4


class PlainParty:
    """A stateful local loop (SGD with momentum, full batch: no randomness) that syncs every 3 steps.
    Every party starts from the same model, so the result does not depend on who joins first."""

    def __init__(self, ctx, index: int, pipeline=None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.params = bind_module(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + index)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g) + index
        self.weight = 10.0 + 30 * index
        self.channel = ctx.channel(self.params.spec, ROUNDS, pipeline=pipeline, seed=index)
        self.error: BaseException | None = None

    def loss(self) -> torch.Tensor:
        return nn.functional.mse_loss(self.model(self.x), self.y)

    def run(self) -> None:
        try:
            self.channel.start(self.params)
            going = True
            while going:
                with torch.no_grad():
                    initial = float(self.loss())  # q-FedAvg's F_k: the loss at the global params
                for _ in range(3):
                    self.opt.zero_grad()
                    self.loss().backward()
                    self.opt.step()
                with torch.no_grad():
                    stats = TrainStats(loss=float(self.loss()), initial_loss=initial)
                going = self.channel.sync(self.params, self.weight, stats=stats)
        except BaseException as exc:
            self.error = exc
        finally:
            self.channel.close()


def run_parties(parties: list[PlainParty]) -> list[FlatParams]:
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a party hung"
    assert [p.error for p in parties] == [None, None]
    return [p.params.clone() for p in parties]


def in_process(strategy: str, pipeline=None, party_pipeline=None) -> list[FlatParams]:
    fed = LocalFederation(2, strategy=strategy, timeout=60, pipeline=pipeline)
    finals = run_parties([PlainParty(fed.context(i), i, party_pipeline) for i in range(2)])
    assert fed.rounds == ROUNDS and len(fed.history) == ROUNDS
    return finals


def over_grpc(strategy: str, pipeline=None, party_pipeline=None) -> list[FlatParams]:
    address = f"127.0.0.1:{free_port()}"
    ctxs = [create_context(p, PARTIES, f"s-{strategy}", address, insecure=True) for p in PARTIES]
    server = FedAvgServer(ctxs[2], strategy=strategy, wait_timeout=60, pipeline=pipeline)
    records: list = []
    arbiter = threading.Thread(target=lambda: records.extend(server.train()), daemon=True)
    arbiter.start()
    finals = run_parties([PlainParty(ctxs[i], i, party_pipeline) for i in range(2)])
    arbiter.join(30)
    assert len(records) == ROUNDS
    return finals


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_strategy_gives_the_same_model_in_process_and_over_grpc(strategy):
    local, grpc = in_process(strategy), over_grpc(strategy)
    for party in (0, 1):
        assert local[party].allclose(local[0], rtol=0, atol=0)  # every party ends with the global model
        assert grpc[party].allclose(local[0], rtol=1e-5, atol=1e-6), f"{strategy}: party {party}"


def test_the_strategy_is_used_in_process():
    """Not FedAvg under every name: the server step changes the model."""
    fedavg, fedyogi = in_process("fedavg")[0], in_process("fedyogi")[0]
    assert not fedavg.allclose(fedyogi, rtol=0, atol=1e-4)


def test_fold_transforms_run_in_process_and_over_grpc_alike():
    clip = build_pipeline(server=[("clip", {"max_norm": 0.01})])
    local, grpc, plain = in_process("fedavg", clip), over_grpc("fedavg", clip), in_process("fedavg")
    assert grpc[0].allclose(local[0], rtol=1e-5, atol=1e-6)
    assert not plain[0].allclose(local[0], rtol=0, atol=1e-3)  # the clip bound the aggregate


def test_party_side_transforms_run_on_each_partys_delta_in_process_and_over_grpc():
    """Each party clips what it sends: the global model moves at most max_norm a round."""
    clip = build_pipeline(client=[("clip", {"max_norm": 0.01})])
    local, grpc = in_process("fedavg", party_pipeline=clip), over_grpc("fedavg", party_pipeline=clip)
    assert grpc[0].allclose(local[0], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    start = bind_module(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))  # PlainParty's initial model
    moved = local[0].sub(start).sq_norm() ** 0.5
    assert 0 < moved <= ROUNDS * 0.01 + 1e-6
