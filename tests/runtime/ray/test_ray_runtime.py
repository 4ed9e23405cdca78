"""The Ray runtime gives the single-process result: partial sums, per-client deltas, a killed worker, evaluation.

One local Ray session (200 MB object store, no dashboard) and one 2-worker runtime serve most of the module:
starting Ray and its workers costs seconds on 2 cores.
"""

import ast
import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import fedfleet  # noqa: E402
from fedfleet.client import TorchTrainer  # noqa: E402
from fedfleet.config.schema import JobConfig, RuntimeConfig  # noqa: E402
from fedfleet.core.fit_config import FitConfig  # noqa: E402
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop  # noqa: E402
from fedfleet.core.params import FlatParams  # noqa: E402
from fedfleet.core.pipeline import EMPTY  # noqa: E402
from fedfleet.data import federate, load_dataset, train_test_split  # noqa: E402
from fedfleet.errors import ConfigError, TrainingDivergedError  # noqa: E402
from fedfleet.jobs.simulation import Simulation  # noqa: E402
from fedfleet.models import build_model  # noqa: E402
from fedfleet.runtime.ray import RayOptions, RayRuntime, WorkerLostError, split_cohort  # noqa: E402
from fedfleet.runtime.ray.ship import land, ship  # noqa: E402
from fedfleet.runtime.sim import SequentialRuntime  # noqa: E402
from fedfleet.select import UniformSelector  # noqa: E402
from fedfleet.strategy import build_strategy  # noqa: E402
from fedfleet.transforms import build_pipeline  # noqa: E402

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report (and no network attempt) from a test
    "RAY_DEDUP_LOGS": "0",  # every worker's own lines, should one fail
}


@pytest.fixture(scope="module")
def ray_session():
    with pytest.MonkeyPatch.context() as mp:  # Ray's processes read these when they start
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        # 4 logical CPUs: the shared 2-worker runtime and one more
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # as each 1-CPU worker trains; two threads of a tiny CNN only contend with the workers on 2 cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    train, test = train_test_split(load_dataset("digits"), 0.2, seed=0)
    return federate(train, clients=30, scheme="dirichlet", seed=0, alpha=0.3), test


def make_trainer(**kw):
    torch.manual_seed(0)
    return TorchTrainer(build_model("simple_cnn", (1, 8, 8), 10, padding=1), **kw)


@pytest.fixture(scope="module")
def ray_runtime(ray_session, digits):
    fed, test = digits
    runtime = RayRuntime(make_trainer(), fed, test, options=RayOptions(workers=2))
    runtime.start()
    yield runtime
    runtime.close()


def run(runtime, strategy, rounds=3, callbacks=(), trainer=make_trainer, pipeline=None, **fit):
    initial = trainer().params.clone()
    if isinstance(runtime, RayRuntime):
        runtime.strategy = strategy  # the shared runtime serves each test's strategy
        runtime.pipeline = pipeline or EMPTY
    loop = RoundLoop(
        strategy,
        runtime,
        UniformSelector(),
        initial,
        FitConfig(**{"batch_size": 10, "lr": 0.05, **fit}),
        LoopConfig(rounds=rounds, cohort=6, seed=3, eval_every=rounds),
        callbacks,
        pipeline=pipeline,
    )
    return loop.global_params, loop.run()


def test_fold_transforms_run_in_the_workers_and_give_the_single_process_model(digits, ray_runtime):
    """A mergeable fold chain (server-side clipping) runs where each worker folds its share."""
    strat, pipeline = build_strategy("fedavg"), build_pipeline(server=[("clip", {"max_norm": 0.05})])
    expected = single_process(digits, strat, pipeline=pipeline)
    got = run(ray_runtime, strat, pipeline=pipeline)
    assert ray_runtime.partial_sums
    assert_same_run(expected, got)
    unclipped = single_process(digits, strat)
    assert not unclipped[0].allclose(expected[0], rtol=0, atol=1e-3)


def single_process(digits, strategy, trainer=make_trainer, **kw):
    fed, test = digits
    return run(SequentialRuntime(trainer(), fed, test), strategy, trainer=trainer, **kw)


def assert_same_run(a, b):
    (pa, ha), (pb, hb) = a, b
    assert pa.allclose(pb, rtol=0, atol=1e-5)
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("clients", "train_samples", "sim_round_s", "sim_time_s"):  # per-client bookkeeping
            assert ra.metrics[key] == rb.metrics[key], key
        assert ra.metrics["train_loss"] == pytest.approx(rb.metrics["train_loss"], rel=1e-5)
    assert ha[-1].metrics["test_accuracy"] == pytest.approx(hb[-1].metrics["test_accuracy"], abs=1e-9)
    assert ha[-1].metrics["test_loss"] == pytest.approx(hb[-1].metrics["test_loss"], rel=1e-5)


@pytest.mark.parametrize(("strategy", "fit"), [("fedavg", {}), ("qfedavg", {"steps": 4}), ("fedyogi", {})])
def test_ray_equals_single_process(digits, ray_runtime, strategy, fit):
    strat = build_strategy(strategy)
    expected = single_process(digits, strat, **fit)
    got = run(ray_runtime, strat, **fit)
    # every strategy's aggregator merges: each worker sends one partial (q-FedAvg's too), not one delta per client
    assert ray_runtime.partial_sums
    assert_same_run(expected, got)
    assert [r.metrics["workers"] for r in got[1]] == [2.0, 2.0, 2.0]


def test_a_killed_worker_is_replaced_and_the_run_is_unchanged(digits, ray_runtime):
    class KillWorker0(Callback):
        def on_round_end(self, loop, record):
            if record.round == 0:
                ray.kill(loop.runtime.workers[0])

    strat = build_strategy("fedavg")
    expected = single_process(digits, strat, rounds=2)
    got = run(ray_runtime, strat, rounds=2, callbacks=[KillWorker0()])
    assert_same_run(expected, got)
    assert [r.metrics["workers_replaced"] for r in got[1]] == [0.0, 1.0]


def test_params_kept_per_client_stay_with_their_client(ray_session, digits):
    # keep_local: each client's own rows live in the worker that trains it, round after round, and the
    # central evaluation (every client's rows) gathers them from all workers
    fed, test = digits
    strat = build_strategy("fedavg")

    def personal():
        return make_trainer(keep_local=[r"^0\.bias$"])

    sequential = SequentialRuntime(personal(), fed, test)
    expected = run(sequential, strat, trainer=personal, rounds=2)
    with RayRuntime(personal(), fed, test, strategy=strat, options=RayOptions(workers=2)) as runtime:
        got = run(runtime, strat, rounds=2, trainer=personal)
        kept = runtime.state_dict()  # gathered from both workers, for a checkpoint
    assert_same_run(expected, got)
    assert got[1][-1].metrics["train_local_rows"] > 0
    assert_same_rows(kept, sequential.state_dict())

    # a resumed run: the checkpoint's rows reach the worker that trains each client
    # one worker now (the module's shared 2-worker runtime holds 2 of the 4 CPUs): every row moves to it
    with RayRuntime(personal(), fed, test, strategy=strat, options=RayOptions(workers=1)) as runtime:
        runtime.load_state_dict(kept)
        assert_same_rows(runtime.state_dict(), kept)  # not started yet: held for the workers
        runtime.start()
        assert_same_rows(runtime.state_dict(), kept)  # from the worker


def assert_same_rows(a, b):
    pairs = [tuple(e) for e in a["entries"]]
    assert sorted(pairs) == sorted(tuple(e) for e in b["entries"]) and pairs
    where = {tuple(e): i for i, e in enumerate(b["entries"])}
    for i, pair in enumerate(pairs):
        j = where[pair]
        assert torch.equal(a[f"{i}/index"], b[f"{j}/index"])
        assert torch.allclose(a[f"{i}/values"], b[f"{j}/values"], rtol=0, atol=1e-5)


def test_a_users_error_in_a_worker_keeps_its_message(ray_runtime):
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        run(ray_runtime, build_strategy("fedavg"), rounds=1, lr=1e12)


def test_workers_that_keep_dying_end_the_run_with_the_cause(ray_runtime, monkeypatch):
    # the last test of the shared runtime: its worker 1 stays dead (a later user would replace it)
    spawn = ray_runtime._spawn

    def dead_on_arrival():
        worker = spawn()
        ray.kill(worker)
        return worker

    monkeypatch.setattr(ray_runtime, "_spawn", dead_on_arrival)
    monkeypatch.setattr(ray_runtime, "options", dataclasses.replace(ray_runtime.options, max_replacements=2))
    ray.kill(ray_runtime.workers[1])
    with pytest.raises(WorkerLostError, match=r"Ray worker 1 died 3 time\(s\) in round 1; last cause: .*"):
        run(ray_runtime, build_strategy("fedavg"), rounds=1)


def test_kind_ray_from_the_job_config(digits):
    runtime = RuntimeConfig(kind="ray", workers=3, cpus_per_worker=2, vectorize="off")
    sim = Simulation.from_config(dataclasses.replace(JobConfig(), runtime=runtime))
    assert isinstance(sim.loop.runtime, RayRuntime)  # nothing started yet: a dry run stays cheap
    assert sim.loop.runtime.workers == []
    assert sim.loop.runtime.options == RayOptions(workers=3, cpus_per_worker=2.0, gpus_per_worker=0.0, vectorize="off")
    fed, test = digits
    model = build_model("simple_cnn", (1, 8, 8), 10, padding=1)
    sim = Simulation.build(model, fed, test=test, device="cpu", ray=RayOptions(workers=2))
    assert isinstance(sim.loop.runtime, RayRuntime) and sim.loop.runtime.workers == []


def test_ray_keys_need_kind_ray():
    with pytest.raises(ValueError, match=r"runtime\.workers applies to runtime\.kind: ray"):
        RuntimeConfig(workers=2)
    with pytest.raises(ValueError, match=r"runtime\.workers must be > 0"):
        RuntimeConfig(kind="ray", workers=0)


def test_no_module_imports_ray_at_import_time():
    """fedfleet imports where Ray is not installed: Ray is imported only inside functions that need it."""
    root = Path(fedfleet.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in _imports_run_on_import(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def _imports_run_on_import(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not those inside functions)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            stack.extend(ast.iter_child_nodes(node))
    return found


def test_kind_ray_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"Ray is not installed; install it with: pip install 'fedfleet\[ray\]'"):
        Simulation.from_config(dataclasses.replace(JobConfig(), runtime=RuntimeConfig(kind="ray")))


def test_split_cohort_is_contiguous_and_balanced():
    assert split_cohort([5, 1, 7, 3], [10, 10, 10, 10], 2) == [[5, 1], [7, 3]]
    assert split_cohort([5, 1, 7, 3], [30, 10, 10, 10], 2) == [[5], [1, 7, 3]]
    assert split_cohort([4], [10], 3) == [[], [4], []]
    assert split_cohort([], [], 2) == [[], []]


def test_ship_keeps_dtypes_shapes_and_parameters():
    obj = {
        "bf16": torch.arange(6, dtype=torch.bfloat16).view(2, 3),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.ones(3)),
        "flat": FlatParams.from_tensors({"w": torch.arange(4.0)}),
    }
    back = land(ship(obj))
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], obj["bf16"])
    assert back["empty"].shape == (0, 4)
    assert isinstance(back["param"], torch.nn.Parameter) and back["param"].requires_grad
    assert back["flat"].allclose(obj["flat"])
    writable = land(ship(obj), writable=True)
    writable["bf16"].add_(1)  # a copy: the shipped bytes are untouched
    assert torch.equal(land(ship(obj))["bf16"], obj["bf16"])


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RayOptions(workers=0)
    with pytest.raises(ValueError, match="vectorize must be one of"):
        RayOptions(vectorize="sometimes")


def test_more_workers_than_the_cluster_holds_is_a_config_error(ray_session, digits):
    fed, test = digits
    runtime = RayRuntime(make_trainer(), fed, test, options=RayOptions(workers=64))
    with pytest.raises(ConfigError, match=r"runtime\.workers=64 needs 64 CPUs"):
        runtime.start()


def test_workers_waiting_for_cpus_other_jobs_hold_time_out_with_the_cause(ray_session, digits, ray_runtime):
    """The module's runtime holds some of the session's 4 CPUs: one worker more than the free CPUs fits the
    cluster but not what is free, and Ray would queue it forever."""
    ray_runtime.start()
    free = int(ray.available_resources().get("CPU", 0))
    fed, test = digits
    # long enough for the workers that have CPUs to start (a cold worker imports torch: seconds)
    runtime = RayRuntime(make_trainer(), fed, test, options=RayOptions(workers=free + 1, start_timeout=15))
    with pytest.raises(ConfigError, match=rf"{free} of {free + 1} Ray workers started within 15 s.*free now: 0 CPUs"):
        runtime.start()
    assert runtime.workers == []  # those that started were stopped, their CPUs given back
    deadline = time.monotonic() + 20
    while int(ray.available_resources().get("CPU", 0)) < free and time.monotonic() < deadline:
        time.sleep(0.2)  # Ray frees a killed actor's CPUs asynchronously
    assert int(ray.available_resources().get("CPU", 0)) == free
