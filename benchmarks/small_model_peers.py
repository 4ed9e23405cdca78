"""The peer frameworks' side of benchmarks/small_model.py: pfl-research and Flower, each in a venv of its own.

``run_side`` starts ``small_model.py --side pfl|flower`` with that venv's interpreter and reads its JSON result
(and, for pfl, its final params); inside, ``side_main`` runs workload S the way that framework's users write it.
Kept apart from the comparison itself (``small_model.py``) so each file says one thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common import (
    SmallWorkload,
    client_batches,
    client_bounds,
    cohorts,
    local_sgd,
    log,
    make_small_federation,
    make_small_model,
    small_workload,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
PFL_VENV = HERE / ".pfl-venv"
PFL_PACKAGES = ["torch==2.13.0", "pfl", "numpy", "safetensors", "pyyaml"]  # torch first: no CUDA build pulled


# -- pfl-research, in its own venv ------------------------------------------------------------------------
def ensure_pfl_venv() -> None:
    """Create benchmarks/.pfl-venv if missing (torch pinned first); put fedfleet's src and these benchmarks on
    its path."""
    py = PFL_VENV / "bin" / "python"
    probe = [str(py), "-c", "import pfl, torch"]
    if not (py.exists() and subprocess.run(probe, capture_output=True).returncode == 0):
        OUT.mkdir(exist_ok=True)
        install_log = OUT / "pfl-install.log"
        log(f"creating {PFL_VENV} and installing {' '.join(PFL_PACKAGES)} (log: {install_log})")
        with open(install_log, "w") as f:
            for cmd in (
                [sys.executable, "-m", "venv", str(PFL_VENV)],
                [str(py), "-m", "pip", "install", PFL_PACKAGES[0]],
                [str(py), "-m", "pip", "install", *PFL_PACKAGES],
            ):
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"installing pfl failed at: {' '.join(cmd)}\n{install_log.read_text()[-3000:]}")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "fedfleet_bench.pth").write_text(f"{ROOT / 'src'}\n{HERE}\n")


def pfl_side(w: SmallWorkload) -> dict[str, Any]:
    """Runs inside .pfl-venv: S on pfl's simulator, as a pfl user writes it, following fedfleet's schedule."""
    import numpy as np
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    fed = make_small_federation(w)
    bounds = client_bounds(fed)
    net = make_small_model(w)

    class PflNet(nn.Module):  # pfl's model protocol: loss(*data) and metrics(*data)
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def loss(self, x: Tensor, y: Tensor, eval: bool = False) -> Tensor:
            self.eval() if eval else self.train()
            return nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: Tensor, y: Tensor, eval: bool = False) -> dict[str, Any]:
            loss = nn.functional.cross_entropy(self(x), y, reduction="sum").item()
            return {"loss": Weighted(loss, len(y))}

    model_module = PflNet()
    order = [cid for cohort in cohorts(w) for cid in cohort]  # fedfleet's cohorts, one user after another
    served = {"n": 0}

    def next_user() -> int:
        cid = order[served["n"]]
        served["n"] += 1
        return cid

    def make_user(cid: int) -> Dataset:
        # the round of this user (pfl asks for users in sampler order), its data in fedfleet's batch order
        rnd = (served["n"] - 1) // w.cohort
        lo, hi = bounds[cid]
        perm = torch.cat(client_batches(w, rnd, cid, hi - lo))
        return Dataset(raw_data=[fed.x[lo:hi][perm], fed.y[lo:hi][perm]], user_id=cid)

    dataset = FederatedDataset(make_user, next_user)
    model = PyTorchModel(
        model=model_module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(model_module.parameters(), lr=1.0),  # w += mean of the deltas
    )
    params = NNAlgorithmParams(
        central_num_iterations=w.rounds,
        evaluation_frequency=10**9,
        train_cohort_size=w.cohort,
        val_cohort_size=None,
    )
    train = NNTrainHyperParams(local_learning_rate=w.lr, local_num_epochs=w.epochs, local_batch_size=w.batch_size)
    backend = SimulatedBackend(training_data=dataset, val_data=None, postprocessors=[])
    t, c = time.perf_counter(), time.process_time()
    FederatedAveraging().run(
        algorithm_params=params,
        backend=backend,
        model=model,
        model_train_params=train,
        model_eval_params=NNEvalHyperParams(local_batch_size=w.batch_size),
        callbacks=[],
        send_metrics_to_platform=False,
    )
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    import pfl.version

    final = {k: v.detach().numpy() for k, v in net.named_parameters()}
    version = pfl.version.__version__
    return {"seconds": seconds, "cpu_seconds": cpu, "users": served["n"], "pfl": version, "params": final, "np": np}


# -- Flower, in its own venv ------------------------------------------------------------------------------
_ACTOR: dict[Any, Any] = {}  # per Ray actor process: S's data and one reusable model, built once


def _actor_state(w: SmallWorkload) -> tuple[Any, list[tuple[int, int]], nn.Module]:
    key = dataclasses.astuple(w)
    if key not in _ACTOR:
        _ACTOR.clear()
        fed = make_small_federation(w)
        _ACTOR[key] = (fed, client_bounds(fed), make_small_model(w))
    return _ACTOR[key]


def _flower_client_fn(context: Any) -> Any:
    import numpy as np
    from flwr.client import NumPyClient
    from flwr.common.constant import PARTITION_ID_KEY

    class SClient(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list, int, dict]:
            torch.set_num_threads(1)
            w = SmallWorkload(**json.loads(config["workload"]))
            fed, bounds, model = _actor_state(w)
            with torch.no_grad():
                for p, a in zip(model.parameters(), parameters, strict=True):
                    p.copy_(torch.from_numpy(a))
            lo, hi = bounds[self.cid]
            local_sgd(
                model, fed.x[lo:hi], fed.y[lo:hi], client_batches(w, int(config["round"]), self.cid, hi - lo), w.lr
            )
            return [p.detach().numpy() for p in model.parameters()], hi - lo, {"cid": self.cid}

    return SClient(int(context.node_config[PARTITION_ID_KEY])).to_client()


def flower_side(w: SmallWorkload) -> dict[str, Any]:
    """Runs inside .flower-venv: start_simulation with a FedAvg that takes fedfleet's cohort each round."""
    import flwr
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import start_simulation

    import small_model_peers  # by name, so Ray pickles the client function by reference

    schedule = cohorts(w)
    spec = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(w).items()})
    marks: list[float] = []

    class CohortFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
            marks.append(time.perf_counter())
            by_partition = {proxy.partition_id: proxy for proxy in client_manager.all().values()}
            ins = FitIns(parameters, {"round": server_round - 1, "workload": spec})
            return [(by_partition[cid], ins) for cid in schedule[server_round - 1]]

    model = make_small_model(w)
    strategy = CohortFedAvg(
        initial_parameters=ndarrays_to_parameters([p.detach().numpy() for p in model.parameters()]),
        fraction_fit=w.cohort / w.clients,
        min_fit_clients=w.cohort,
        min_available_clients=w.clients,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
    )
    t0 = time.perf_counter()
    start_simulation(
        client_fn=small_model_peers._flower_client_fn,
        num_clients=w.clients,
        config=ServerConfig(num_rounds=w.rounds),
        strategy=strategy,
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        ray_init_args={"num_cpus": 2, "include_dashboard": False, "ignore_reinit_error": True},
    )
    end = time.perf_counter()
    rounds = [b - a for a, b in zip(marks, [*marks[1:], end], strict=True)]
    return {"engine_s": end - t0, "start_s": marks[0] - t0, "rounds_s": rounds, "flwr": flwr.__version__}


def run_side(side: str, w: SmallWorkload, timeout: float) -> dict[str, Any]:
    """One side in its venv as a subprocess; its JSON result (and final params, for pfl)."""
    if side == "pfl":
        ensure_pfl_venv()
        py = PFL_VENV / "bin" / "python"
    else:
        from vs_flower import ensure_flower_venv, venv_python

        ensure_flower_venv()
        py = venv_python()
    OUT.mkdir(exist_ok=True)
    params = OUT / f"{side}_small_params.npz"
    changes = json.dumps({"model": w.model, "rounds": w.rounds})
    cmd = [str(py), str(HERE / "small_model.py"), "--side", side, "--workload", changes, "--params", str(params)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log(f"running {side}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    (OUT / f"{side}_small.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if params.exists() and side == "pfl":
        import numpy as np

        with np.load(params) as z:
            result["params"] = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    return result


def side_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    w = small_workload(**json.loads(args.workload))
    if args.side == "pfl":
        out = pfl_side(w)
        np = out.pop("np")
        np.savez(args.params, **out.pop("params"))
    else:
        out = flower_side(w)
    print(json.dumps(out), flush=True)
