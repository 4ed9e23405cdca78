"""Mixed precision for sharded training, chosen by what the device can do, never by a driver or CUDA version.

xFFL's recipe read the CUDA version to decide whether bf16 was available, which turned bf16 off on AMD GPUs
(ROCm reports no CUDA version) and forced fp32 there. Here a device is asked: ``torch.cuda.is_bf16_supported``
(true on ROCm GPUs that have it, false on a V100), the CPU's bf16 instructions (AVX-512 BF16 or AMX, through
oneDNN), ``torch.xpu.is_bf16_supported`` on Intel GPUs, and for any other device a tiny bf16 matmul that must run.

The policy keeps the sharded master weights in fp32 (what the optimizer steps and a sync exchanges), computes
in ``param_dtype`` (the all-gathered copies are cast) and reduces gradients in fp32, as FSDP users know it from
``MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from fedfleet.errors import ConfigError

log = logging.getLogger("fedfleet.hpc")

# what ``precision=`` takes, and the compute dtype each means ("auto" is decided per device)
PRECISIONS: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively (not emulated at a fraction of its fp32 speed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    xpu = getattr(torch, "xpu", None)
    if device.type == "xpu" and xpu is not None and hasattr(xpu, "is_bf16_supported"):
        return bool(xpu.is_bf16_supported())
    return _runs_bf16(device)


def _runs_bf16(device: torch.device) -> bool:
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16, device=device)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype forward and backward run in: ``"bf16"``, ``"fp32"``, or ``"auto"`` (bf16 where ``device`` has it).

    ``"bf16"`` on a device without it is refused rather than emulated slowly."""
    if precision not in PRECISIONS:
        hint = " (fp16 needs loss scaling, not done here: use bf16 or fp32)" if precision == "fp16" else ""
        raise ConfigError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}{hint}")
    chosen = PRECISIONS[precision]
    has_bf16 = bf16_supported(device)
    if chosen is None:
        chosen = torch.bfloat16 if has_bf16 else torch.float32
        log.info("precision auto on %s: %s", torch.device(device), "bf16" if has_bf16 else "fp32 (no native bf16)")
    elif chosen is torch.bfloat16 and not has_bf16:
        raise ConfigError(f"precision='bf16': {torch.device(device)} has no native bf16; use 'auto' or 'fp32'")
    return chosen


def mixed_precision_policy(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2's policy for computing in ``dtype``: fp32 masters and fp32 gradient reductions either way."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
