"""The Flower half of ``secagg_vs_flower.py``; runs inside ``benchmarks/.flower-venv`` (flwr 1.x).

One SecAgg+ round of Flower's own code for n clients in one process, with no Ray, no SuperLink and no gRPC:
the server is ``flwr.server.workflow.SecAggPlusWorkflow`` (its four stages, called as a ServerApp calls them)
and each client is ``flwr.client.mod.secaggplus_mod`` (the mod a ClientApp puts in front of its train
function) with a ``Context`` of its own, as a SuperNode keeps one per node. ``InProcessGrid`` stands in for
the SuperLink: ``send_and_receive`` hands each Message to its node's mod and returns the replies, so the
round pays for Flower's protocol (P-384 key pairs and ECDH, Shamir shares with PyCryptodome, Fernet
encryption, numpy-seeded masks, quantisation, the unmasking) and for its messages and per-node state
records, but not for any transport. The ClientApp behind the mod returns the client's update as a FitRes
(its train step, done before the round). Clients that drop out are not called from the stage they drop
at, as if their replies timed out.

The strategy is the smallest the workflow accepts: ``configure_fit`` picks every node with an empty
FitIns (no model broadcast; fedfleet's side sends none either) and ``aggregate_fit`` keeps the workflow's
unmasked weighted mean (FedAvg's would average n copies of it again).

Timed: the whole workflow call (all four stages, the clients' work included), each stage, and within
each stage the clients' time (their mod calls) apart from the server's. The result is checked against
the plain weighted mean of the same clipped updates, computed the way Flower weights and clips
(clip(f_i * x_i) with f_i = round(w_i / max_weight * range) / range), within the quantisation bound.

    python benchmarks/flower_secagg_side.py --clients 100 --params 10000 --neighbours 14 --threshold 8
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any

import numpy as np


def make_round(n: int, m: int, seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, int], set[int]]:
    """The round both sides run: n float32 updates of m params (N(0, 0.3^2)), integer weights in 1..999,
    and the 5% of party ids 1..n that drop out (the recipe of benchmarks/secagg.py's round)."""
    rng = np.random.default_rng(seed)
    inputs = {i: (rng.standard_normal(m) * 0.3).astype(np.float32) for i in range(1, n + 1)}
    weights = {i: int(rng.integers(1, 1000)) for i in inputs}
    gone = set(rng.choice(np.arange(1, n + 1), size=max(1, n // 20), replace=False).tolist())
    return inputs, weights, gone


def flower_round(args: argparse.Namespace, inputs, weights, gone: set[int]) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    from flwr.supercore.task_identity import TaskIdentity

    # what a ServerApp process is told at its start (the Messages it creates carry them)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0
    ids = sorted(inputs)
    clock = {"clients_s": 0.0, "transport_s": 0.0}

    class Node:  # what the workflow needs of a ClientProxy: its node id
        def __init__(self, node_id: int) -> None:
            self.node_id = node_id

    class AllNodes(FedAvg):
        """Every node trains; the workflow's unmasked mean is the result."""

        final: list[np.ndarray] | None = None

        def configure_fit(self, server_round, parameters, client_manager):
            empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
            return [(Node(i), FitIns(empty, {})) for i in ids]

        def aggregate_fit(self, server_round, results, failures):
            self.final_parameters = results[0][1].parameters  # the same unmasked mean in every result
            return self.final_parameters, {}

    def train(i: int):
        """The ClientApp behind the mod: its update and weight as the FitRes a NumPyClient's fit returns."""

        def call_next(msg: Message, ctxt: Context) -> Message:
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([inputs[i]]), weights[i], {})
            return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

        return call_next

    contexts = {i: Context(run_id=0, node_id=i, node_config={}, state=RecordDict(), run_config={}) for i in ids}
    apps = {i: train(i) for i in ids}
    dropped_at_unmask = set(gone)

    class InProcessGrid:
        """The SecAgg+ workflow's only use of a Grid: send messages, get the replies of those still there."""

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                nid = msg.metadata.dst_node_id
                stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if stage == Stage.UNMASK and nid in dropped_at_unmask:
                    continue  # dropped after its masked vector: no reply (a timeout)
                t = time.perf_counter()
                # a transport hands each node its own copy (the setup stage sends one content to all, and
                # the mod pops the stage key out of it)
                delivered = copy.deepcopy(msg)
                t1 = time.perf_counter()
                replies.append(secaggplus_mod(delivered, contexts[nid], apps[nid]))
                t2 = time.perf_counter()
                clock["clients_s"] += t2 - t1
                clock["transport_s"] += t1 - t
            return replies

    strategy = AllNodes()
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})

    workflow = SecAggPlusWorkflow(
        num_shares=args.neighbours + 1,  # Flower counts the node's own share: k neighbours + itself
        reconstruction_threshold=args.threshold,
        max_weight=args.max_weight,
        clipping_range=args.clip,
        quantization_range=args.range,
        modulus_range=2**32,
    )
    grid = InProcessGrid()
    state = WorkflowState()
    stages: dict[str, dict[str, float]] = {}
    ok = True
    t_round = time.perf_counter()
    for step in (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
        workflow.unmask_stage,
    ):
        c0, x0, t0 = clock["clients_s"], clock["transport_s"], time.perf_counter()
        ok = step(grid, context, state)
        wall, clients, moved = time.perf_counter() - t0, clock["clients_s"] - c0, clock["transport_s"] - x0
        stages[step.__name__] = {
            "wall_s": wall,
            "clients_s": clients,
            "server_s": wall - clients - moved,
            "copy_s": moved,
        }
        if not ok:
            break
    round_s = time.perf_counter() - t_round
    if not ok:
        raise SystemExit(f"Flower's SecAgg+ halted at {step.__name__} (see the log above)")

    # The check, after the timing: Flower's mean beside the plain mean of the same clipped, weighted updates
    mean = parameters_to_ndarrays(strategy.final_parameters)[0]
    alive = [i for i in ids if i in state.sampled_node_ids]
    q = {i: round(weights[i] / args.max_weight * args.range) for i in alive}
    f = {i: q[i] / args.range for i in alive}
    plain = sum(np.clip(inputs[i].astype(np.float64) * f[i], -args.clip, args.clip) for i in alive)
    ref = plain / sum(f.values())
    err = float(np.abs(mean - ref).max())
    bound = len(alive) * 2 * args.clip / args.range / sum(f.values())  # one level per client, over sum f
    unmask = stages["unmask_stage"]
    return {
        "round_s": round_s,
        "server_unmask_s": unmask["server_s"],
        "server_total_s": sum(s["server_s"] for s in stages.values()),
        "clients_total_s": clock["clients_s"],
        "copy_s": clock["transport_s"],
        "stages": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in stages.items()},
        "in_sum": len(alive),
        "dropped_at_unmask": len(dropped_at_unmask),
        "num_shares": state.num_shares,
        "threshold": state.threshold,
        "mean_abs_err": err,
        "mean_bound": bound,
        "correct": err <= bound,
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--neighbours", type=int, required=True, help="k: each client's neighbours (even)")
    ap.add_argument("--threshold", type=int, required=True, help="shares needed to rebuild a secret")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--range", type=int, default=2**16 - 1, help="Flower's quantization_range (levels - 1)")
    ap.add_argument("--max-weight", type=float, default=1000.0)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    if args.neighbours % 2:
        raise SystemExit("Flower's SecAgg+ ring gives each client an even number of neighbours")

    import flwr

    logging.getLogger("flwr").setLevel(logging.WARNING)  # the workflow logs every stage at INFO
    inputs, weights, gone = make_round(args.clients, args.params)
    # warm-up: imports, first-use costs, on a tiny round
    small = argparse.Namespace(**{**vars(args), "neighbours": 4, "threshold": 3})
    w_in, w_w, w_gone = make_round(10, 100, seed=1)
    flower_round(small, w_in, w_w, w_gone)
    runs = [flower_round(args, inputs, weights, gone) for _ in range(args.repeats)]
    print(
        json.dumps({"flwr": flwr.__version__, "numpy": np.__version__, "runs": runs}, default=float),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
