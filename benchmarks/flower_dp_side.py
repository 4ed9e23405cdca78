"""The Flower half of ``dp_utility.py``; runs inside ``benchmarks/.flower-venv`` (flwr[simulation] + Ray).

Central DP the way a Flower user writes it: ``FedAvg`` wrapped in
``DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled_clients)``
(flwr's server-side fixed clipping: each client's update w_k - w is clipped to L2 norm C on the server, FedAvg
averages the clipped models weighted by examples, then N(0, (z C / m)^2) is added to every coordinate of the
average, m = num_sampled_clients). FedAvg samples exactly ``cohort`` clients a round (``fraction_fit`` and
``min_fit_clients``, Python's ``random.sample``); flwr has no accountant, so ``z`` comes from
``dp_utility.py`` (dp-accounting's RDP, see there). A run without ``noise_multiplier`` is plain FedAvg.

Nothing here imports fedfleet: the data split, the initial weights and the model's hidden sizes come from the
npz that ``dp_utility.py`` wrote from fedfleet's own job, and each Ray actor reads its clients' rows from that
file once (a module-level cache), so no data travels through Ray. Local training is what fedfleet's trainer does
with the job's client section: ``epochs`` passes of shuffled batches of ``batch_size``, plain SGD at ``lr``,
mean cross-entropy.

``--runs`` is a JSON list of runs (seed, noise_multiplier or null, params path), done one after another in this
process on one Ray instance (``keep_initialised``), so interpreter and Ray start-up are paid once. Prints one JSON
line last: per run the seconds of its ``start_simulation`` call and the final params' path.

    python benchmarks/flower_dp_side.py --data out/dp_utility/seed0.npz --rounds 40 --cohort 100 --clip 1 \
        --runs '[{"seed": 0, "noise_multiplier": 2.9, "params": "out/z.npz"}]'
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

_DATA: dict[str, Any] = {}  # per Ray actor process: the npz's training rows, offsets and one reusable model


def build_mlp(input_dim: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """fedfleet's ``mlp`` (Flatten, Linear + ReLU per hidden layer, Linear): the same parameter names and order."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _actor_data(path: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, nn.Module]:
    if path not in _DATA:
        with np.load(path) as z:
            x = torch.from_numpy(z["train_x"].copy())
            y = torch.from_numpy(z["train_y"].copy())
            offsets = z["offsets"].copy()
            hidden = [int(h) for h in z["hidden"]]
            num_classes = int(z["num_classes"])
        _DATA.clear()
        _DATA[path] = (x, y, offsets, build_mlp(int(np.prod(x.shape[1:])), hidden, num_classes))
    return _DATA[path]


@functools.cache
def _client_class() -> type:
    from flwr.client import NumPyClient

    class DPClient(NumPyClient):
        """One virtual client: the job's local epochs on partition ``cid``, from the given weights."""

        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list, int, dict]:
            torch.set_num_threads(1)
            x, y, offsets, model = _actor_data(str(config["data"]))
            with torch.no_grad():
                for p, a in zip(model.parameters(), parameters, strict=True):
                    p.copy_(torch.from_numpy(a))
            lo, hi = int(offsets[self.cid]), int(offsets[self.cid + 1])
            xs, ys = x[lo:hi], y[lo:hi]
            n, bs = hi - lo, int(config["batch_size"])
            gen = torch.Generator().manual_seed(
                int(config["seed"]) * 1_000_003 + int(config["round"]) * 10_007 + self.cid
            )
            opt = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
            for _ in range(int(config["epochs"])):
                perm = torch.randperm(n, generator=gen)
                for start in range(0, n, bs):
                    idx = perm[start : start + bs]
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
                    opt.step()
            return [p.detach().numpy().copy() for p in model.parameters()], n, {}

    return DPClient


def client_fn(context: Any) -> Any:
    from flwr.common.constant import PARTITION_ID_KEY

    return _client_class()(int(context.node_config[PARTITION_ID_KEY])).to_client()


def run_one(args: argparse.Namespace, run: dict[str, Any], initial: list[np.ndarray], clients: int) -> dict[str, Any]:
    """One federated training of ``args.rounds`` rounds; the final global model goes to ``run["params"]``."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.simulation import start_simulation

    seed = int(run["seed"])
    random.seed(seed)  # FedAvg's cohort: client_manager.sample draws with random.sample
    np.random.seed(seed)  # flwr's DP noise: np.random.normal on the global generator
    final: dict[int, list[np.ndarray]] = {}

    def keep_final(server_round: int, params: list[np.ndarray], config: dict) -> tuple[float, dict] | None:
        final[server_round] = [a.copy() for a in params]  # the global model after each round (0: initial)
        return None

    fit_config = {
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": seed,
    }
    strategy: Any = FedAvg(
        fraction_fit=args.cohort / clients,
        min_fit_clients=args.cohort,
        min_available_clients=clients,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda rnd: {**fit_config, "round": rnd},
        evaluate_fn=keep_final,
    )
    z = run.get("noise_multiplier")
    if z is not None:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=float(z), clipping_norm=args.clip, num_sampled_clients=args.cohort
        )
    t0 = time.perf_counter()
    start_simulation(
        client_fn=client_fn,
        num_clients=clients,
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        client_resources={"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
        ray_init_args={"num_cpus": args.cpus, "include_dashboard": False, "ignore_reinit_error": True},
        keep_initialised=True,
    )
    seconds = time.perf_counter() - t0
    if args.rounds not in final:
        raise SystemExit(f"the Flower run (seed {seed}, z {z}) did not finish its {args.rounds} rounds")
    names = run["names"]
    np.savez(run["params"], **dict(zip(names, final[args.rounds], strict=True)))
    return {"seed": seed, "noise_multiplier": z, "params": run["params"], "engine_s": round(seconds, 3)}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="Flower's central DP (server-side fixed clipping), run by dp_utility.py")
    ap.add_argument("--data", required=True, help="npz from dp_utility.py: the split, offsets, initial weights")
    ap.add_argument("--runs", required=True, help="JSON list of {seed, noise_multiplier (null: no DP), params}")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--cohort", type=int, required=True)
    ap.add_argument("--clip", type=float, required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use")
    ap.add_argument("--cpus-per-client", type=float, default=1, help="Ray num_cpus of one client actor")
    args = ap.parse_args(argv)

    import flwr

    torch.set_num_threads(1)
    with np.load(args.data) as z:
        names = [str(n) for n in z["names"]]
        initial = [z[f"init_{i}"].copy() for i in range(len(names))]
        clients = len(z["offsets"]) - 1
    done = []
    for run in json.loads(args.runs):
        done.append(run_one(args, {**run, "names": names}, initial, clients))
        print(f"flower run done: {done[-1]}", file=sys.stderr, flush=True)
    import ray

    ray.shutdown()
    print(json.dumps({"flwr": flwr.__version__, "torch": torch.__version__, "runs": done}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import flower_dp_side  # the module by name, so Ray pickles client_fn by reference, not by value

    flower_dp_side.main(sys.argv[1:])
