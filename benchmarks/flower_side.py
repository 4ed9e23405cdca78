"""The Flower half of ``vs_flower.py``; runs inside ``benchmarks/.flower-venv`` (flwr[simulation] + Ray).

Workload W on Flower's Ray simulation engine (``flwr.simulation.start_simulation``, the engine that
drives a Strategy + NumPyClient pair in flwr 1.x; the newer ``run_simulation`` takes ServerApp /
ClientApp objects instead). The run is made to do exactly what fedfleet does:

- ``CohortFedAvg`` (a ``FedAvg`` subclass) picks fedfleet's cohort in ``configure_fit``: the
  UniformSelector with the job seed, mapped onto Flower's clients by their partition id;
- ``BenchClient`` (a ``NumPyClient``) loads the global weights and runs ``torch.optim.SGD`` over the
  batches fedfleet's trainer would draw (``batch_indices`` seeded with ``client_seed``);
- ``aggregate_fit`` folds the results in fedfleet's order and formula, w + sum n_k (w_k - w) / sum n_k,
  in float32 torch, so the final model matches bit for bit. ``--aggregate flower`` uses FedAvg's own
  ``aggregate_fit`` instead (the same maths as a model average; rounding differences then grow through
  training, see overhead.py).

Each Ray actor builds W's data and one model once (module-level cache, keyed by the workload), so no
data travels through Ray. Writes the final params to ``--params`` (npz) and prints one JSON line last:
the end-to-end engine time (``start_simulation`` call, Ray start included) and per-round times.

    python benchmarks/flower_side.py --rounds 20 --params out/flower.npz --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any

import numpy as np
import torch


def _workload(config: dict[str, Any]) -> Any:
    from common import Workload

    return Workload(
        clients=int(config["clients"]),
        per_client=int(config["per_client"]),
        cohort=int(config["cohort"]),
        rounds=int(config["rounds"]),
        epochs=int(config["epochs"]),
        batch_size=int(config["batch_size"]),
        lr=float(config["lr"]),
        seed=int(config["seed"]),
    )


_STATE: dict[Any, Any] = {}  # per Ray actor process: the workload's data and one reusable model


def _actor_state(w: Any) -> tuple[Any, list[tuple[int, int]], torch.nn.Module]:
    from common import client_bounds, make_federation, make_model

    key = (w.clients, w.per_client, w.seed)
    if key not in _STATE:
        fed = make_federation(w)
        _STATE.clear()
        _STATE[key] = (fed, client_bounds(fed), make_model(w))
    return _STATE[key]


@functools.cache
def _client_class() -> type:
    from flwr.client import NumPyClient

    from common import client_batches, local_sgd

    class BenchClient(NumPyClient):
        """One virtual client: train W's local epoch on partition ``cid`` from the given weights."""

        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list, int, dict]:
            torch.set_num_threads(int(config["threads"]))
            w = _workload(config)
            fed, bounds, model = _actor_state(w)
            with torch.no_grad():
                for p, a in zip(model.parameters(), parameters, strict=True):
                    p.copy_(torch.from_numpy(a))
            lo, hi = bounds[self.cid]
            batches = client_batches(w, int(config["round"]), self.cid, hi - lo)
            local_sgd(model, fed.x[lo:hi], fed.y[lo:hi], batches, w.lr)
            return [p.detach().numpy() for p in model.parameters()], hi - lo, {"cid": self.cid}

    return BenchClient


def client_fn(context: Any) -> Any:
    from flwr.common.constant import PARTITION_ID_KEY

    return _client_class()(int(context.node_config[PARTITION_ID_KEY])).to_client()


def _strategy_class() -> type:
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    class CohortFedAvg(FedAvg):
        """FedAvg whose cohort each round is fedfleet's, and whose fold is fedfleet's (see module doc)."""

        def __init__(self, *, cohorts: list[list[int]], fit_config: dict[str, Any], aggregate: str, **kw: Any) -> None:
            super().__init__(**kw)
            self.cohorts = cohorts
            self.fit_config = fit_config
            self.aggregate = aggregate
            self.global_nd: list[np.ndarray] = []
            self.final: list[np.ndarray] = []
            self.round_start: list[float] = []
            self.round_end: list[float] = []

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
            self.round_start.append(time.perf_counter())
            rnd = server_round - 1  # Flower counts rounds from 1, fedfleet from 0
            if self.aggregate == "fedfleet":
                self.global_nd = parameters_to_ndarrays(parameters)
            by_partition = {proxy.partition_id: proxy for proxy in client_manager.all().values()}
            ins = FitIns(parameters, {**self.fit_config, "round": rnd})
            return [(by_partition[cid], ins) for cid in self.cohorts[rnd]]

        def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed: {failures[:1]}")
            expected = self.cohorts[server_round - 1]
            got = sorted(int(res.metrics["cid"]) for _, res in results)
            if got != expected:
                raise RuntimeError(f"round {server_round}: trained {got}, expected the cohort {expected}")
            if self.aggregate == "flower":
                params, metrics = super().aggregate_fit(server_round, results, failures)
                self.final = parameters_to_ndarrays(params)
            else:
                self.final = fold_like_fedfleet(self.global_nd, results)
                params, metrics = ndarrays_to_parameters(self.final), {}
            self.round_end.append(time.perf_counter())
            return params, metrics

    return CohortFedAvg


def fold_like_fedfleet(global_nd: list[np.ndarray], results: list) -> list[np.ndarray]:
    """fedfleet's FedAvg on per-tensor float32: clients in cohort (sorted id) order,
    acc += n_k * (w_k - w); acc *= 1 / sum n_k; w += acc."""
    from flwr.common import parameters_to_ndarrays

    glob = [torch.from_numpy(a) for a in global_nd]
    acc = [torch.zeros_like(g) for g in glob]
    total = 0.0
    for _, res in sorted(results, key=lambda r: int(r[1].metrics["cid"])):
        for a, g, wk in zip(acc, glob, parameters_to_ndarrays(res.parameters), strict=True):
            a.add_(torch.from_numpy(wk) - g, alpha=float(res.num_examples))
        total += float(res.num_examples)
    return [(g + a.mul_(1.0 / total)).numpy() for g, a in zip(glob, acc, strict=True)]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="W on Flower's simulation engine (run by vs_flower.py)")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--params", required=True, help="where to write the final params (npz)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads inside each client actor")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use")
    ap.add_argument("--cpus-per-client", type=float, default=2, help="Ray num_cpus of one client actor")
    ap.add_argument("--aggregate", choices=("fedfleet", "flower"), default="fedfleet")
    args = ap.parse_args(argv)

    import flwr
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.simulation import start_simulation

    from common import cohorts, make_model, workload

    torch.set_num_threads(args.threads)
    w = workload(False, args.rounds)
    model = make_model(w)
    names = [n for n, _ in model.named_parameters()]
    initial = [p.detach().numpy().copy() for p in model.parameters()]
    fit_config = {k: v for k, v in w.as_dict().items() if k not in ("shape", "num_classes")}
    strategy = _strategy_class()(
        cohorts=cohorts(w),
        fit_config={**fit_config, "threads": args.threads},
        aggregate=args.aggregate,
        initial_parameters=ndarrays_to_parameters(initial),
        fraction_fit=w.cohort / w.clients,
        min_fit_clients=w.cohort,
        min_available_clients=w.clients,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
    )

    t0 = time.perf_counter()
    start_simulation(
        client_fn=client_fn,
        num_clients=w.clients,
        config=ServerConfig(num_rounds=w.rounds),
        strategy=strategy,
        client_resources={"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
        ray_init_args={"num_cpus": args.cpus, "include_dashboard": False, "ignore_reinit_error": True},
    )
    engine_s = time.perf_counter() - t0

    if len(strategy.final) != len(names) or len(strategy.round_end) != w.rounds:
        raise SystemExit(f"the simulation did not finish its {w.rounds} rounds")
    np.savez(args.params, **dict(zip(names, strategy.final, strict=True)))
    rounds_s = [e - s for s, e in zip(strategy.round_start, strategy.round_end, strict=True)]
    result = {
        "flwr": flwr.__version__,
        "engine": "flwr.simulation.start_simulation (Ray)",
        "engine_s": engine_s,
        "start_s": strategy.round_start[0] - t0,  # Ray start, actor pool, until round 1 is configured
        "rounds_s": rounds_s,
        "aggregate": args.aggregate,
        "cpus_per_client": args.cpus_per_client,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import flower_side  # the module by name, so Ray pickles client_fn by reference, not by value

    flower_side.main(sys.argv[1:])
