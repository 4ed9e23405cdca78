"""DeepSpeed configs for ``TrainingArguments(deepspeed=...)``: ZeRO stages 0-3, fp32 or bf16, optional offload.

Every size the Trainer already knows (batch sizes, accumulation, learning rate, betas, clipping) is left as
``"auto"``, so the Trainer fills it in and the two never disagree. Without an ``optimizer`` section the Trainer's
own torch optimizer is used; ``offload_optimizer=True`` moves the optimizer to the CPU, where DeepSpeed
runs its own DeepSpeedCPUAdam (a C++ op compiled on first use).

A config written with numbers of its own (FATE-LLM's tutorials give the batch size, Adam's learning rate and a
WarmupLR's peak and steps) goes through ``reconcile``: ``FedAvgClient`` replaces every number that disagrees with
its TrainingArguments by ``"auto"`` and says so, where transformers would refuse to train.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedfleet.errors import ConfigError

log = logging.getLogger("fedfleet.hf")

ZERO_STAGES = (0, 1, 2, 3)


def zero_config(stage: int, *, bf16: bool = False, offload_optimizer: bool = False) -> dict[str, Any]:
    """A DeepSpeed config dict for ZeRO ``stage``; pass it as ``TrainingArguments(deepspeed=...)``."""
    if stage not in ZERO_STAGES:
        raise ConfigError(f"ZeRO stage {stage!r}: use one of {ZERO_STAGES}")
    if offload_optimizer and stage == 0:
        raise ConfigError("offload_optimizer needs ZeRO stage 1, 2 or 3 (stage 0 keeps the optimizer on the device)")
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # save_model() writes a normal model file (gathered on rank 0), not only a ZeRO checkpoint
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def load_deepspeed_config(spec: str) -> dict[str, Any]:
    """``"zero2"`` (a preset: zero0..zero3, ``-offload`` for a CPU optimizer) or the path of a JSON config."""
    presets = {f"zero{s}": zero_config(s) for s in ZERO_STAGES}
    presets.update({f"zero{s}-offload": zero_config(s, offload_optimizer=True) for s in ZERO_STAGES if s})
    if spec in presets:
        return presets[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--deepspeed {spec!r}: neither a preset ({', '.join(sorted(presets))}) nor a JSON file")
    return json.loads(path.read_text())


# The numbers both a DeepSpeed config and TrainingArguments give, as transformers compares them (its
# HfTrainerDeepSpeedConfig); a config value that disagrees makes the Trainer refuse to train, at train() time.
# (key in the config, the TrainingArguments it must equal, that value)
SIZES: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("train_micro_batch_size_per_gpu", "per_device_train_batch_size", lambda a: a.per_device_train_batch_size),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", lambda a: a.gradient_accumulation_steps),
    (
        "train_batch_size",
        "world_size x per_device_train_batch_size x gradient_accumulation_steps",
        lambda a: a.world_size * a.per_device_train_batch_size * a.gradient_accumulation_steps,
    ),
    ("gradient_clipping", "max_grad_norm", lambda a: a.max_grad_norm),
    ("optimizer.params.lr", "learning_rate", lambda a: a.learning_rate),
    ("optimizer.params.betas", "adam_beta1, adam_beta2", lambda a: [a.adam_beta1, a.adam_beta2]),
    ("optimizer.params.eps", "adam_epsilon", lambda a: a.adam_epsilon),
    ("optimizer.params.weight_decay", "weight_decay", lambda a: a.weight_decay),
    ("scheduler.params.warmup_max_lr", "learning_rate", lambda a: a.learning_rate),
)
# Known only once the run's length is (when training starts): None where it cannot be told yet. An explicit
# value that may disagree becomes "auto" too, which turns into the same number when it would have agreed.
LATER: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("scheduler.params.warmup_num_steps", "warmup_steps", lambda a: _warmup_steps(a)),
    ("scheduler.params.total_num_steps", "max_steps", lambda a: a.max_steps if a.max_steps > 0 else None),
)
# Choices, not sizes: "auto" would silently change the numerics, so a disagreement is an error
SWITCHES: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("fp16.enabled", "fp16", lambda a: bool(a.fp16 or a.fp16_full_eval)),
    ("bf16.enabled", "bf16", lambda a: bool(a.bf16 or a.bf16_full_eval)),
)


def reconcile(training_args: Any) -> list[str]:
    """Make ``TrainingArguments(deepspeed=...)``'s config agree with the TrainingArguments, as ``"auto"`` would:
    each size (batch sizes, learning rate, Adam's betas, clipping, WarmupLR's peak and warm-up steps) that
    disagrees is replaced by the TrainingArguments value, with a warning naming both; a precision switch that
    disagrees is a ConfigError. FATE-LLM's tutorial configs give such numbers twice, and transformers refuses
    them at ``train()``. Returns the notes logged (none without DeepSpeed)."""
    hf = getattr(training_args, "hf_deepspeed_config", None)
    if hf is None:
        return []
    for key, name, value in SWITCHES:
        node, leaf = hf.find_config_node(key)
        given = None if node is None else node.get(leaf)
        if given not in (None, "auto") and given != value(training_args):
            raise ConfigError(
                f"the DeepSpeed config's {key}={given} but TrainingArguments {name}={value(training_args)}: "
                f"a precision is a choice fedfleet will not make for you; give both the same, or "
                f'{key.split(".")[0]}: {{"enabled": "auto"}}'
            )
    notes = [n for key, name, value in SIZES + LATER if (n := _replace(hf, key, name, value(training_args)))]
    if notes:
        hf.mismatches.clear()  # recorded when the TrainingArguments were made; checked again now, by transformers
        hf.trainer_config_process(training_args)
    for note in notes:
        log.warning("%s", note)
    return notes


def _replace(hf: Any, key: str, name: str, value: Any) -> str:
    """Set ``key`` to "auto" where the config gives a number other than ``value`` (None: not known yet)."""
    node, leaf = hf.find_config_node(key)
    given = None if node is None else node.get(leaf)
    if given in (None, "auto") or given == value:
        return ""
    node[leaf] = "auto"
    now = "the Trainer's count" if value is None else f"{name}={value}"
    return (
        f"DeepSpeed config {key}={given} replaced by 'auto' ({now}), as transformers requires the two to agree; "
        f"to train with {given}, give it to TrainingArguments ({name})"
    )


def _warmup_steps(args: Any) -> int | None:
    """transformers' warm-up for a DeepSpeed scheduler: at least 1 step; a fraction of the run is not known yet."""
    if args.warmup_steps >= 1:
        return int(args.warmup_steps)
    return 1 if args.warmup_steps == 0 else None
