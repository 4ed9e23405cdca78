"""``fedfleet simulate``: job file -> typed config -> checks -> run folder -> rounds -> final line."""

from __future__ import annotations

import dataclasses
import sys

import yaml

from fedfleet.callbacks import (
    CheckpointCallback,
    EarlyStopping,
    MetricsFileCallback,
    ProgressCallback,
    TensorBoardCallback,
)
from fedfleet.callbacks import resume as resume_from_checkpoint
from fedfleet.config import load_job, to_dict
from fedfleet.core.loop import Callback
from fedfleet.errors import UserError
from fedfleet.run_dir import RunDir
from fedfleet.simulation import Simulation


def simulate_command(
    job_path: str,
    overrides: list[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
) -> int:
    job = load_job(job_path, overrides)
    sim = Simulation.from_config(job)  # every check that can fail runs here, before the run folder exists
    if dry_run:
        print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
        print(f"# ok: {sim.federation.num_clients} clients, {sim.trainer.params.numel:,} params", file=sys.stderr)
        return 0
    run = RunDir.prepare(job.output.dir, job.name, resume=resume, overwrite=overwrite)
    (run.path / "config.yaml").write_text(yaml.safe_dump(to_dict(job), sort_keys=False))
    sim.loop.callbacks.extend(_callbacks(job, run, quiet))
    if resume and resume_from_checkpoint(sim.loop, run.path):
        print(f"resuming {run.path} after round {sim.loop.round}", file=sys.stderr)
    run.write_status("running", round=sim.loop.round)
    try:
        history = sim.run()
    except KeyboardInterrupt:
        run.write_status("interrupted", round=sim.loop.round)
        print(
            f"\ninterrupted: rounds 1-{sim.loop.round} are saved in {run.path}; "
            f"continue with: fedfleet simulate {job_path} --resume",
            file=sys.stderr,
        )
        return 130
    except UserError as exc:
        run.write_status("failed", round=sim.loop.round, error=str(exc))
        raise
    except BaseException as exc:
        run.write_status("failed", round=sim.loop.round, error=repr(exc))
        raise
    sim.save_model(run.path / "model.safetensors")
    final = _last_metrics(history)
    state = "finished" if sim.loop.round == job.rounds else "stopped early"
    run.write_json("result.json", {"rounds": sim.loop.round, "final": final})
    run.write_status(state, round=sim.loop.round)
    accuracy = final.get("test_accuracy")
    if accuracy is not None:
        print(f"final test accuracy: {accuracy:.2%} after {sim.loop.round} rounds ({run.path})")
    else:
        print(f"done: {sim.loop.round} rounds ({run.path})")
    return 0


def _callbacks(job, run: RunDir, quiet: bool) -> list[Callback]:
    callbacks: list[Callback] = [MetricsFileCallback(run.path)]
    if job.output.tensorboard:
        callbacks.append(TensorBoardCallback(run.path / "tb"))
    if job.output.early_stopping is not None:
        callbacks.append(EarlyStopping(**dataclasses.asdict(job.output.early_stopping)))
    callbacks.append(CheckpointCallback(run.path, every=job.output.checkpoint_every))
    if job.output.progress and not quiet:
        callbacks.append(ProgressCallback())
    return callbacks


def _last_metrics(history) -> dict[str, float]:
    """The latest value of every metric (test metrics come from the last evaluated round)."""
    final: dict[str, float] = {}
    for record in history:
        final.update(record.metrics)
    return final
