"""Running a round loop inside a run folder, the same for ``simulate`` and ``arbiter``.

The folder gets the config, metrics, TensorBoard events, checkpoints and a status that tells a crashed or
interrupted run from a finished one; Ctrl-C saves the last completed round and prints how to resume.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import yaml

from fedfleet.callbacks import (
    CheckpointCallback,
    EarlyStopping,
    MetricsFileCallback,
    OneOf,
    ProgressCallback,
    TensorBoardCallback,
)
from fedfleet.callbacks import resume as resume_from_checkpoint
from fedfleet.config import JobConfig, to_dict
from fedfleet.core.loop import Callback, RoundLoop, RoundRecord
from fedfleet.core.serialize import save_params
from fedfleet.errors import UserError
from fedfleet.jobs.run_dir import RunDir


def run_loop_in_folder(
    loop: RoundLoop,
    job: JobConfig,
    *,
    resume_command: str,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    checkpoint_every: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    run = RunDir.prepare(job.output.dir, job.name, resume=resume, overwrite=overwrite)
    (run.path / "config.yaml").write_text(yaml.safe_dump(to_dict(job), sort_keys=False))
    clock = "sim_time_s" if getattr(loop.runtime, "virtual_clock", True) else "wall_time_s"
    loop.callbacks.extend(_callbacks(job, run, quiet, checkpoint_every or job.output.checkpoint_every, clock))
    if resume and resume_from_checkpoint(loop, run.path):
        print(f"resuming {run.path} after round {loop.round}", file=sys.stderr)
    run.write_status("running", round=loop.round)
    if on_ready is not None:
        on_ready()
    try:
        history = loop.run()
    except KeyboardInterrupt:
        run.write_status("interrupted", round=loop.round)
        saved = f"{loop.unit}s 1-{loop.round} are saved" if loop.round else f"no {loop.unit} was complete yet"
        print(f"\ninterrupted: {saved} in {run.path}; continue with: {resume_command} --resume", file=sys.stderr)
        return 130
    except UserError as exc:
        run.write_status("failed", round=loop.round, error=str(exc))
        raise
    except BaseException as exc:
        run.write_status("failed", round=loop.round, error=repr(exc))
        raise
    save_params(loop.global_params, run.path / "model.safetensors")
    final = _last_metrics(history)
    state = "finished" if loop.round == job.rounds else "stopped early"
    run.write_json("result.json", {"rounds": loop.round, "final": final})
    run.write_status(state, round=loop.round)
    if job.system is not None or job.fedbuff is not None:  # the virtual clock: the time it would take in the field
        print(_time_summary(final, loop))
    if "dp_epsilon" in final:
        spent = f"epsilon {final['dp_epsilon']:.3f} at delta {final['dp_delta']:g}"
        print(f"privacy spent: {spent} ({job.privacy.where} DP)")
    summary = headline(final)
    if summary:
        print(f"final {summary} after {loop.round} {loop.unit}s ({run.path})")
    else:
        print(f"done: {loop.round} {loop.unit}s ({run.path})")
    return 0


# the metric a run is judged by, first found: a click model's AUC and log loss (its accuracy is about the
# majority rate whatever it learns), else a classifier's accuracy; the arbiter's own, else the parties'
HEADLINES: tuple[tuple[str, str, str], ...] = (
    ("test_auc", "test AUC", ".4f"),
    ("test_accuracy", "test accuracy", ".2%"),
    ("test_party_auc", "test AUC", ".4f"),
    ("test_party_accuracy", "test accuracy", ".2%"),
)
COMPANIONS = {"test_auc": "test_log_loss", "test_party_auc": "test_party_log_loss"}


def headline(metrics: dict[str, float]) -> str:
    """``test AUC: 0.7312, log loss 0.5120`` (or the accuracy, ...) from a run's final metrics; "" if none."""
    for key, label, fmt in HEADLINES:
        if key in metrics:
            text = f"{label}: {metrics[key]:{fmt}}"
            companion = COMPANIONS.get(key)
            if companion in metrics:
                text += f", log loss {metrics[companion]:.4f}"
            return text
    return ""


def _callbacks(job: JobConfig, run: RunDir, quiet: bool, checkpoint_every: int, clock: str) -> list[Callback]:
    callbacks: list[Callback] = [MetricsFileCallback(run.path)]
    if job.output.tensorboard:
        callbacks.append(TensorBoardCallback(run.path / "tb"))
    if job.output.early_stopping is not None:
        callbacks.append(EarlyStopping(**dataclasses.asdict(job.output.early_stopping)))
    callbacks.append(CheckpointCallback(run.path, every=checkpoint_every))
    if job.output.progress and not quiet:
        privacy = ("dp_epsilon",) if job.privacy is not None else ()  # the budget spent so far, every round
        judged_by = OneOf(tuple(key for key, _, _ in HEADLINES), until_seen="test_accuracy")  # as the final line
        callbacks.append(ProgressCallback(columns=("train_loss", "test_loss", judged_by, *privacy, clock)))
    return callbacks


def _time_summary(final: dict[str, float], loop: RoundLoop) -> str:
    line = f"simulated time: {_duration(final.get('sim_time_s', 0.0))} (wall {_duration(loop.wall_time)})"
    target = loop.config.target
    if target is not None:
        reached = loop.time_to_target
        line += (
            f"; {loop.config.target_metric} {target:g} reached after {_duration(reached['sim_time_s'])} simulated "
            f"({loop.unit} {int(reached['round']) + 1}, wall {_duration(reached['wall_time_s'])})"
            if reached is not None
            else f"; {loop.config.target_metric} {target:g} not reached"
        )
    return line


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _last_metrics(history: list[RoundRecord]) -> dict[str, float]:
    """The latest value of every metric (test metrics come from the last evaluated round)."""
    final: dict[str, float] = {}
    for record in history:
        final.update(record.metrics)
    return final
