"""The file runtime end to end: the round loop's arbiter and parties in threads, exchanging real files in tmp_path."""

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedfleet.callbacks.checkpoint import CheckpointCallback, resume
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, RoundIncomplete
from fedfleet.core.params import FlatParams
from fedfleet.jobs.simulation import Simulation
from fedfleet.runtime.files import Exchange, Refused, exchange
from fedfleet.runtime.files.exchange import MANIFEST, PARAMS, publish
from fedfleet.runtime.files.party import wait_for_global
from tests.paths import ROOT
from tests.runtime.files.file_jobs import PARTIES, POLL, SESSION, arbiter, load, party, start


def test_a_file_exchanged_run_ends_at_the_simulated_model(tmp_path):
    job = load(tmp_path)
    ex = tmp_path / "exchange"
    loop, _ = arbiter(job, ex)
    threads = [start(party(job, ex, name).run, job.rounds) for name in PARTIES]
    history = loop.run()
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    assert [r.metrics["clients"] for r in history] == [3.0, 3.0, 3.0]
    assert all(r.metrics["rejected"] == 0 and r.metrics["timed_out"] == 0 for r in history)
    sim = Simulation.from_config(job)
    sim.run()
    assert not loop.global_params.allclose(sim.trainer.params.zeros_like())
    # the same maths; only the order the updates arrive in (and so the float rounding of the sum) differs
    assert loop.global_params.allclose(sim.loop.global_params, rtol=0, atol=1e-5)
    # the layout the issue names, manifests last, no temp files left behind
    for rnd in (1, 2, 3):
        folder = ex / f"round-{rnd:04d}"
        assert sorted(p.name for p in (folder / "global").iterdir()) == [MANIFEST, PARAMS]
        assert sorted(p.name for p in (folder / "updates").iterdir()) == sorted(PARTIES)
        for name in PARTIES:
            assert sorted(p.name for p in (folder / "updates" / name).iterdir()) == [MANIFEST, PARAMS]


class _StopAfter(Callback):
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_round_end(self, loop, record) -> None:
        if loop.round == self.rounds:
            loop.request_stop()


def test_an_arbiter_stopped_and_resumed_from_its_checkpoint_ends_at_the_simulated_model(tmp_path):
    """FedAvgM's server momentum travels in the checkpoint; the parties, waiting on the exchange folder, never
    notice that the arbiter went away after round 2 and a new one resumed."""
    job = load(tmp_path, extra="strategy: {name: fedavgm}\n")
    ex, ckpt = tmp_path / "exchange", tmp_path / "ckpt"
    ckpt.mkdir()
    threads = [start(party(job, ex, name).run, job.rounds) for name in PARTIES]
    first, _ = arbiter(job, ex, callbacks=[CheckpointCallback(ckpt), _StopAfter(2)])
    assert len(first.run()) == 2
    second, _ = arbiter(job, ex, callbacks=[CheckpointCallback(ckpt)])
    assert resume(second, ckpt) and second.round == 2
    history = second.run()
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    assert [r.round for r in history] == [0, 1, 2]
    sim = Simulation.from_config(job)
    sim.run()
    assert second.global_params.allclose(sim.loop.global_params, rtol=0, atol=1e-5)


def _bad_party(job, ex, kind: str, stage):
    """Publishes a zero delta for PARTIES[2] with one thing wrong, staged elsewhere and moved in manifest last."""
    spec = party(job, ex, PARTIES[2]).trainer.params.spec
    found = wait_for_global(Exchange(ex), 1, spec, session=SESSION, timeout=20, poll_s=POLL)
    body = {
        "session": SESSION,
        "party": PARTIES[0] if kind == "party" else PARTIES[2],
        "round": 2 if kind == "round" else 1,
        "kind": "update",
        "weight": 2e9 if kind == "weight" else 10.0,
        "is_delta": True,
        "metrics": {},
        "stats": {},
        "global_manifest_sha256": found.sha256,
    }
    delta = found.params.zeros_like()
    if kind in ("nan", "huge"):
        delta.buffers[torch.float32][5] = float("nan") if kind == "nan" else 1e32
    publish(stage, delta, body)
    params = stage / PARAMS
    if kind == "checksum":  # same size, one byte of the data changed
        data = bytearray(params.read_bytes())
        data[-1] ^= 0xFF
        params.write_bytes(bytes(data))
    elif kind == "truncated":
        params.write_bytes(params.read_bytes()[:-100])
    elif kind == "missing":
        params.unlink()
    dest = Exchange(ex).update_dir(1, PARTIES[2])
    dest.mkdir(parents=True)
    if params.exists():
        os.replace(params, dest / PARAMS)
    os.replace(stage / MANIFEST, dest / MANIFEST)


@pytest.mark.parametrize(
    ("kind", "file", "why"),
    [
        ("checksum", PARAMS, "SHA-256"),
        ("missing", PARAMS, "missing"),
        ("truncated", PARAMS, "bytes, the manifest says"),
        ("round", MANIFEST, "round is 2, expected 1"),
        ("party", MANIFEST, f"party is '{PARTIES[0]}', expected '{PARTIES[2]}'"),
        ("nan", PARAMS, "holds NaN or infinite values"),
        ("weight", MANIFEST, "weight 2e+09 over the limit 1e+09"),
        ("huge", MANIFEST, "would overflow the sum"),
    ],
)
def test_a_bad_update_is_refused_naming_the_file_and_the_round_goes_on(tmp_path, caplog, kind, file, why):
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, runtime = arbiter(job, ex, min_parties=2)
    threads = [start(party(job, ex, name).run, 1) for name in PARTIES[:2]]
    threads.append(start(_bad_party, job, ex, kind, tmp_path / "stage"))
    with caplog.at_level(logging.WARNING, logger="fedfleet.arbiter"):
        history = loop.run()
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    named = str(ex / "round-0001" / "updates" / PARTIES[2] / file)
    assert len(runtime.refusals) == 1
    assert runtime.refusals[0].startswith(named) and why in runtime.refusals[0]
    assert named in caplog.text
    assert history[0].metrics["clients"] == 2.0 and history[0].metrics["rejected"] == 1.0


def test_a_party_that_never_publishes_is_timed_out_and_named(tmp_path, caplog):
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, _ = arbiter(job, ex, min_parties=2, round_timeout=2.0)
    threads = [start(party(job, ex, name).run, 1) for name in PARTIES[:2]]
    with caplog.at_level(logging.WARNING, logger="fedfleet.arbiter"):
        history = loop.run()
    for thread in threads:
        thread.join(20)
    assert history[0].metrics["clients"] == 2.0 and history[0].metrics["timed_out"] == 1.0
    assert f"without an update from {PARTIES[2]}" in caplog.text
    # with every party needed (none started here), the round is incomplete and says whom it waited for
    strict, _ = arbiter(job, tmp_path / "strict", min_parties=3, round_timeout=0.5)
    with pytest.raises(RoundIncomplete, match=f"no update from {', '.join(PARTIES)}"):
        list(strict.runtime.fit(strict.global_params, [0, 1, 2], FitConfig(round=0, seed=3)))


def test_an_update_without_its_manifest_is_never_read(tmp_path, monkeypatch):
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, runtime = arbiter(job, ex, min_parties=1, round_timeout=20)
    reads = []
    real = exchange.open_published
    monkeypatch.setattr(exchange, "open_published", lambda path: reads.append((time.monotonic(), path)) or real(path))
    dest = Exchange(ex).update_dir(1, PARTIES[0])
    moments = {}

    def slow_party():
        worker = party(job, ex, PARTIES[0])
        stage = Exchange(tmp_path / "stage")
        wait_for_global(Exchange(ex), 1, worker.trainer.params.spec, session=SESSION, timeout=20, poll_s=POLL)
        # train into a private exchange holding the same global (a copy of its files), then move the files in by hand
        shutil.copytree(Exchange(ex).global_dir(1), stage.global_dir(1))
        worker.exchange = stage
        worker.run_round(1)
        staged = stage.update_dir(1, PARTIES[0])
        dest.mkdir(parents=True)
        os.replace(staged / PARAMS, dest / PARAMS)
        time.sleep(20 * POLL)  # the arbiter polls many times meanwhile
        moments["manifest"] = time.monotonic()
        os.replace(staged / MANIFEST, dest / MANIFEST)

    thread = start(slow_party)
    updates = list(runtime.fit(loop.global_params, [0], FitConfig(round=0, seed=3, batch_size=16)))
    yielded = time.monotonic()
    thread.join(20)
    assert not thread.errors
    assert len(updates) == 1 and yielded > moments["manifest"]
    mine = [t for t, path in reads if path == dest / PARAMS]
    assert mine and min(mine) > moments["manifest"]


def test_manifest_checks_refuse_a_foreign_layout_and_a_foreign_session(tmp_path):
    job = load(tmp_path, rounds=1)
    loop, _ = arbiter(job, tmp_path / "exchange")
    folder = tmp_path / "one"
    body = {"session": SESSION, "party": "arbiter", "round": 1, "kind": "global"}
    publish(folder, loop.global_params, body)
    with pytest.raises(Refused, match=f"manifest.json: session is '{SESSION}', expected 'other'"):
        exchange.verify(folder / MANIFEST, {**body, "session": "other"}, loop.global_params.spec)
    other = FlatParams.from_tensors({"w": torch.zeros(3)})
    with pytest.raises(Refused, match="layout is not the global model's"):
        exchange.verify(folder / MANIFEST, body, other.spec)
    assert exchange.verify(folder / "nothing" / MANIFEST, body, None) is None


def test_keep_last_prunes_only_what_its_manifests_list(tmp_path):
    job = load(tmp_path)
    ex = tmp_path / "exchange"
    loop, _ = arbiter(job, ex, keep_last=1)
    (ex / "round-0001").mkdir(parents=True)
    (ex / "round-0001" / "notes.txt").write_text("the user's")
    threads = [start(party(job, ex, name).run, job.rounds) for name in PARTIES]
    loop.run()
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    assert sorted(p.name for p in ex.iterdir()) == ["round-0001", "round-0003"]
    assert [p.name for p in (ex / "round-0001").iterdir()] == ["notes.txt"]
    assert len(list((ex / "round-0003").rglob(MANIFEST))) == 4


def test_a_party_run_again_for_a_round_it_answered_does_not_train_again(tmp_path):
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, runtime = arbiter(job, ex, min_parties=1)
    runtime.publish_global(1, loop.global_params, {PARTIES[0]: {"round": 0, "seed": 5, "batch_size": 16}})
    worker = party(job, ex, PARTIES[0])
    first = worker.run_round(1)
    stamp = first.stat().st_mtime_ns
    calls = []
    worker.trainer.fit = lambda *a: calls.append(a)
    assert worker.run_round(1) == first and first.stat().st_mtime_ns == stamp and not calls
    assert party(job, ex, PARTIES[1]).run_round(1) is None  # not selected: nothing published
    assert not Exchange(ex).update_dir(1, PARTIES[1]).exists()


def test_an_update_from_another_global_of_the_round_is_refused(tmp_path):
    """The round published again with other tasks (a resumed run that chose differently): an update made from the
    first publication names its manifest's SHA-256, which is no longer the round's, and is not folded."""
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, runtime = arbiter(job, ex, min_parties=1, round_timeout=0.3)
    runtime.publish_global(1, loop.global_params, {PARTIES[0]: {"round": 0, "seed": 5, "batch_size": 16}})
    party(job, ex, PARTIES[0]).run_round(1)
    with pytest.raises(RoundIncomplete, match="refused 1"):
        list(runtime.fit(loop.global_params, [0], FitConfig(round=0, seed=3, batch_size=16)))
    assert "trained from another global model than round 1's" in runtime.refusals[0]


def test_a_round_run_again_keeps_its_global_and_the_updates_already_made(tmp_path, caplog):
    """The first attempt times out waiting for a late party; the loop runs the round again, the identical global
    stays published, and the two updates already made count with the late one: the simulated model."""
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, runtime = arbiter(job, ex, round_timeout=1.0)
    early = [start(party(job, ex, name).run, 1) for name in PARTIES[:2]]
    late = party(job, ex, PARTIES[2])
    threads = [*early, start(lambda: time.sleep(1.5) or late.run(1))]
    with caplog.at_level(logging.WARNING):
        history = loop.run()
    assert "running round 1 again (attempt 2 of 3)" in caplog.text
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    assert history[0].metrics["clients"] == 3.0 and not runtime.refusals
    sim = Simulation.from_config(job)
    sim.run()
    assert loop.global_params.allclose(sim.loop.global_params, rtol=0, atol=1e-5)


def test_a_party_in_a_process_of_its_own_reaches_the_simulated_model(tmp_path):
    """Nothing but the folder joins it to the arbiter: the site is a process that runs one ``run_party_round`` per
    round (the other two parties are threads, to keep the test short on a busy machine)."""
    job = load(tmp_path, rounds=2)
    ex = tmp_path / "exchange"
    loop, _ = arbiter(job, ex, round_timeout=60)
    command = [sys.executable, "-m", "tests.runtime.files.party_process", str(tmp_path / "job.yaml"), str(ex)]
    proc = subprocess.Popen([*command, PARTIES[2], "2"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    threads = [start(party(job, ex, name).run, 2) for name in PARTIES[:2]]
    try:
        history = loop.run()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    assert [r.metrics["clients"] for r in history] == [3.0, 3.0]
    sim = Simulation.from_config(job)
    sim.run()
    assert loop.global_params.allclose(sim.loop.global_params, rtol=0, atol=1e-5)


def test_a_delta_longer_than_max_update_norm_is_refused(tmp_path):
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, runtime = arbiter(job, ex, min_parties=1, round_timeout=20, max_update_norm=1e-6)
    config = FitConfig(round=0, seed=3, batch_size=16)
    thread = start(party(job, ex, PARTIES[0]).run_round, 1)
    with pytest.raises(RoundIncomplete, match="refused 1"):
        list(runtime.fit(loop.global_params, [0], config))
    thread.join(20)
    assert "params.safetensors" not in runtime.refusals[0] and "over max_update_norm=1e-06" in runtime.refusals[0]


def test_sharded_globals_and_updates_reach_the_simulated_model(tmp_path):
    job = load(tmp_path, rounds=1)
    ex = tmp_path / "exchange"
    loop, _ = arbiter(job, ex, shard_bytes=4096)
    threads = [start(party(job, ex, name, shard_bytes=4096).run, 1) for name in PARTIES]
    history = loop.run()
    for thread in threads:
        thread.join(20)
        assert not thread.errors
    assert history[0].metrics["clients"] == 3.0
    shards = sorted(p.name for p in (ex / "round-0001" / "updates" / PARTIES[0]).glob("params-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"params-00001-of-{len(shards):05d}.safetensors"
    assert (ex / "round-0001" / "global" / shards[-1]).is_file()
    sim = Simulation.from_config(job)
    sim.run()
    assert loop.global_params.allclose(sim.loop.global_params, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["missing", "foreign"])
def test_a_missing_or_foreign_shard_is_refused_naming_it(tmp_path, kind):
    job = load(tmp_path, rounds=1)
    loop, _ = arbiter(job, tmp_path / "exchange")
    spec = loop.global_params.spec
    body = {"session": SESSION, "party": "arbiter", "round": 1, "kind": "global"}
    folder = tmp_path / "one"
    written = publish(folder, loop.global_params, body, shard_bytes=4096)
    second = folder / written["params"][1]
    if kind == "missing":
        second.unlink()
        why = "listed in the manifest but missing"
    else:  # the shard's own tensors and one the model has not, its sum written into the manifest: all sums agree
        save_file({**load_file(str(second)), "intruder": torch.zeros(2)}, str(second))
        written["files"][second.name] = dict(zip(("sha256", "bytes"), exchange.file_sum(second), strict=True))
        exchange.write_manifest(folder, written)
        why = "holds intruder, which the global model has not"
    with pytest.raises(Refused) as refused:
        exchange.verify(folder / MANIFEST, body, spec)
    assert str(refused.value).startswith(str(second)) and why in str(refused.value)
