"""One YAML per side of an Offsite-Tuning job, parsed once into frozen dataclasses (unknown keys are errors).

Model owner::

    role: arbiter            # the model owner
    party_id: "10000"
    session: ot-sciq
    parties: [[guest, "9999"], [host, "10000"], [arbiter, "10000"]]
    address: 127.0.0.1:50051  # tuning; the hand-out listens on port + 1 unless handout_address is given
    certs: certs             # or insecure: true
    model: {model_type: gpt2, n_layer: 12, n_embd: 768, n_head: 12}   # a config (random weights) ...
    # model_path: /models/gpt2                                         # ... or local pretrained weights
    offsite: {emulator_layer_num: 4, adapter_top_layer_num: 2, adapter_bottom_layer_num: 2}
    lora: {r: 8, alpha: 16}  # optional: LoRA on the adapters
    output: out/owner

A data owner adds ``data`` and ``training`` (and ``fed``); ``role`` is guest or host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedfleet.errors import ConfigError
from fedfleet.offsite.plan import OffsitePlan
from fedfleet.offsite.tuning import LoraSettings


@dataclass(frozen=True)
class DataSection:
    texts: int = 200  # review texts (offline, from the reviews wheel); this party takes its share
    held_out: int = 40  # texts kept out of training for the evaluation table
    block: int = 64  # tokens per training example
    share: int = 0  # which share of the texts this party trains on
    shares: int = 1
    seed: int = 0


@dataclass(frozen=True)
class TrainingSection:
    max_steps: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-2
    seed: int = 0
    deepspeed: dict[str, Any] | None = None  # a DeepSpeed config, passed to TrainingArguments as is


@dataclass(frozen=True)
class FedSection:
    aggregate_strategy: str = "epoch"
    aggregate_freq: int | float = 1


@dataclass(frozen=True)
class OffsiteJob:
    role: str
    party_id: str
    session: str
    parties: tuple[tuple[str, str], ...]
    offsite: OffsitePlan
    address: str = "127.0.0.1:50051"
    handout_address: str | None = None
    certs: str | None = "certs"
    insecure: bool = False
    model: dict[str, Any] | None = None
    model_path: str | None = None
    lora: LoraSettings | None = None
    seed: int = 0  # of the model owner's random weights
    output: str = "out"
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    fed: FedSection = field(default_factory=FedSection)

    def model_config(self) -> Any:
        from transformers import AutoConfig

        if self.model_path is not None:
            return AutoConfig.from_pretrained(self.model_path)
        cfg = dict(self.model or {})
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model: needs model_type (e.g. gpt2), or give model_path")
        return AutoConfig.for_model(model_type, **cfg)


_SECTIONS = {
    "offsite": OffsitePlan,
    "lora": LoraSettings,
    "data": DataSection,
    "training": TrainingSection,
    "fed": FedSection,
}


def load_job(path: str | Path) -> OffsiteJob:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return parse_job(raw, str(path))


def parse_job(raw: dict[str, Any], where: str = "job") -> OffsiteJob:
    known = {f.name for f in dataclasses.fields(OffsiteJob)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("role", "party_id", "session", "parties", "offsite"):
        if key not in raw:
            raise ConfigError(f"{where}: missing {key!r}")
    values = dict(raw)
    for key, cls in _SECTIONS.items():
        if values.get(key) is not None:
            section = values[key]
            if not isinstance(section, dict):
                raise ConfigError(f"{where}: {key} must be a mapping")
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(section) - names)
            if bad:
                raise ConfigError(f"{where}: unknown key(s) {bad} in {key}; known: {sorted(names)}")
            values[key] = cls(**section)
    values["parties"] = tuple((str(r), str(i)) for r, i in raw["parties"])
    values["party_id"] = str(raw["party_id"])
    job = OffsiteJob(**values)
    if job.model is None and job.model_path is None:
        raise ConfigError(f"{where}: give model (a config) or model_path")
    return job
