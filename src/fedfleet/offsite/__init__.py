"""Offsite-Tuning (Xiao, Lin and Han, 2023) with FATE-LLM's interface.

The model owner keeps the full model and hands data owners a sub model: the bottom and top blocks (adapters,
trainable), a uniform-stride subset of the middle blocks (the emulator, frozen) and the extras (embeddings, final
norm; frozen). Data owners tune the adapters (optionally LoRA on them), FedAvg-aggregated across owners; the owner
plugs the tuned adapters into the full model.

- :mod:`families` -- where each decoder family keeps its blocks (``register_family`` for a new one);
- :mod:`plan` / :mod:`extract` -- the cut and moving weights; :mod:`models` -- the FATE-LLM base classes and the
  generic ``AutoMainModel`` / ``AutoSubModel``; :mod:`builtins` -- GPT-2 and LLaMA main/sub models;
- :mod:`tuning` -- adapter-only (or LoRA) training setup; :mod:`evaluate` -- the paper's table;
- :mod:`distill` -- the paper's distilled emulator (trained on public text to mimic the full middle);
- :mod:`session` -- the deployed protocol (model owner = arbiter, data owners over gRPC);
- :mod:`row_pieces` -- an embedding shared as numbered row pieces (FATE's ``split_numpy_array``, ...).
"""

from fedfleet.offsite.builtins import GPT2LMHeadMainModel, GPT2LMHeadSubModel, LlamaMainModel, LlamaSubModel
from fedfleet.offsite.distill import distill_emulator, emulator_gap
from fedfleet.offsite.families import FAMILIES, FamilySpec, family_of, register_family
from fedfleet.offsite.models import AutoMainModel, AutoSubModel, OffsiteTuningMainModel, OffsiteTuningSubModel
from fedfleet.offsite.plan import OffsitePlan, uniform_stride
from fedfleet.offsite.row_pieces import join_rows, recover_numpy_array, split_numpy_array, split_rows

__all__ = [
    "FAMILIES",
    "AutoMainModel",
    "AutoSubModel",
    "FamilySpec",
    "GPT2LMHeadMainModel",
    "GPT2LMHeadSubModel",
    "LlamaMainModel",
    "LlamaSubModel",
    "OffsitePlan",
    "OffsiteTuningMainModel",
    "OffsiteTuningSubModel",
    "distill_emulator",
    "emulator_gap",
    "family_of",
    "join_rows",
    "recover_numpy_array",
    "register_family",
    "split_numpy_array",
    "split_rows",
    "uniform_stride",
]
