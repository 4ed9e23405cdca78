"""DeepSpeed configs for ``TrainingArguments(deepspeed=...)``: ZeRO stages 0-3, fp32 or bf16, optional offload.

Every size the Trainer already knows (batch sizes, accumulation, learning rate, betas, clipping) is left as
``"auto"``, so the Trainer fills it in and the two never disagree. Without an ``optimizer`` section the Trainer's
own torch optimizer is used; ``offload_optimizer=True`` moves the optimizer to the CPU, where DeepSpeed
runs its own DeepSpeedCPUAdam (a C++ op compiled on first use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedfleet.errors import ConfigError

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
