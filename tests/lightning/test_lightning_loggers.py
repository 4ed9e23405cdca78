"""The fed metrics (sync count, round train loss, bytes exchanged, samples/s) reach Lightning's loggers."""

from __future__ import annotations

import csv
import json
import math
import struct
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ThroughputMonitor

from fedfleet.lightning import FedArguments, FedLightningCallback, LocalFederation
from tests.lightning_parties import DigitsData, DigitsMLP, make_trainer

FED_KEYS = ("fed/sync", "fed/round_train_loss", "fed/bytes_exchanged", "fed/samples_per_sec", "fed/round_examples")


def fit_with(logger, epochs: int = 2) -> FedLightningCallback:
    """One party (a federation of one, in-process) syncing every 3 steps: 10 steps an epoch -> 7 syncs."""
    fed = FedLightningCallback(LocalFederation(1).context(0), FedArguments("step", 3))
    throughput = ThroughputMonitor(batch_size_fn=lambda batch: batch[0].shape[0], window_size=3)
    trainer, *_ = make_trainer(fed, epochs, logger=logger, log_every_n_steps=1, callbacks=[throughput])
    trainer.fit(DigitsMLP(), DigitsData(0, 1, 32, limit=320))
    assert fed.syncs == 7
    return fed


def check_series(fed: FedLightningCallback, series: dict[str, list[tuple[int, float]]]) -> None:
    """``series[key]``: (step, value) as the logger recorded them; must match the callback's own records."""
    for key in FED_KEYS:
        assert [s for s, _ in series[key]] == [r.step for r in fed.history], key
    assert [v for _, v in series["fed/sync"]] == list(range(1, 8))
    nbytes = fed.access.params.spec.nbytes
    assert [v for _, v in series["fed/bytes_exchanged"]] == [2 * nbytes * k for k in range(1, 8)]
    losses = [v for _, v in series["fed/round_train_loss"]]
    assert losses == pytest.approx([r.round_train_loss for r in fed.history], rel=1e-6)
    assert losses[-1] < losses[0]
    assert all(v > 0 for _, v in series["fed/samples_per_sec"])
    throughput = series.get("train/device/samples_per_sec")  # Lightning's (one device; world: no "device/")
    assert throughput, "Lightning's ThroughputMonitor logged nothing"
    assert all(v > 0 and math.isfinite(v) for _, v in throughput)


def test_csv_logger_records_fed_metrics(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    fed = fit_with(logger)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None) and key != "step":
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    check_series(fed, series)


def test_tensorboard_logger_records_fed_metrics(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fed = fit_with(logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    check_series(fed, series)


def test_wandb_offline_logger_records_fed_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed: pip install wandb (the 'lightning' extra)")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    logger = WandbLogger(project="fedfleet-test", save_dir=str(tmp_path), offline=True)
    fed = fit_with(logger)
    logger.experiment.finish()
    wandb.teardown()  # stops W&B's writer process; until then the run file may lack its last records
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while len(history := wandb_history(run_file)) < fed.syncs and time.monotonic() < deadline:
        time.sleep(0.2)  # a writer that outlives teardown (seen under load) still flushes within seconds
    series: dict[str, list[tuple[int, float]]] = {}
    for items in history:
        for key, value in items.items():
            if "trainer/global_step" in items and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(items["trainer/global_step"]), float(value)))
    check_series(fed, series)


def wandb_history(path: Path) -> list[dict]:
    """The logged rows of an offline W&B run, read from its ``.wandb`` file (LevelDB-log framed protobufs:
    wandb 0.31 ships no Python reader for it, and an offline run writes no summary file)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7  # LevelDB log: 32 KiB blocks, records framed by crc32, length, type
    data, rows, parts = path.read_bytes(), [], b""
    assert data[:4] == b":W&B", "not a W&B run file"
    pos = 7  # the file header: ident, magic, version
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:
            break
        parts += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows
