"""One YAML per side of an Offsite-Tuning job, parsed once into frozen dataclasses (unknown keys are errors).

Model owner::

    role: arbiter            # the model owner
    party_id: "10000"
    session: ot-sciq
    parties: [[guest, "9999"], [host, "10000"], [arbiter, "10000"]]
    address: 127.0.0.1:50051  # tuning; the hand-out listens on port + 1 unless handout_address is given
    certs: certs             # or insecure: true, confirmed with --insecure on the command line
    model: {model_type: gpt2, n_layer: 12, n_embd: 768, n_head: 12}   # a config (random weights) ...
    # model_path: /models/gpt2                                         # ... or local pretrained weights
    offsite: {emulator_layer_num: 4, adapter_top_layer_num: 2, adapter_bottom_layer_num: 2}
    lora: {r: 8, alpha: 16}  # optional: LoRA on the adapters
    output: out/owner

A data owner adds ``data`` and ``training`` (and ``fed``); ``role`` is guest or host. ``data.source`` chooses
what it trains on, both offline: ``reviews`` (review texts as language-model blocks; the table's perplexity) or
``mmlu`` (MMLU questions and answers, FATE's QA task: ``QaDataset`` + ``Seq2SeqCollator``; the table's
multiple-choice accuracy)::

    data: {source: mmlu, texts: 200, held_out: 40, block: 256, share: 0, shares: 2}

Parsed by :mod:`fedfleet.config.loader`, as a job file is: a typo'd key names its path and the closest valid key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedfleet.config.loader import Identifier, load, parse
from fedfleet.errors import ConfigError
from fedfleet.offsite.plan import OffsitePlan
from fedfleet.offsite.tuning import LoraSettings
from fedfleet.registry import did_you_mean
from fedfleet.sync.args import FedArguments

Role = Literal["arbiter", "guest", "host"]


MMLU_QUESTIONS = 281  # distinct questions in the lm-eval wheel's worked MMLU prompts (fedfleet.hf.data.mmlu)


@dataclass(frozen=True)
class DataSection:
    source: Literal["reviews", "mmlu"] = "reviews"  # review texts (the reviews wheel) or MMLU QA (the lm-eval wheel)
    texts: int = 200  # reviews: texts; mmlu: questions; shuffled with seed, this party takes its share
    held_out: int = 40  # of them, kept out of training for the evaluation table
    block: int = 64  # tokens per training example (mmlu: question and answer together, at most)
    share: int = 0  # which share of the rest this party trains on
    shares: int = 1
    seed: int = 0
    reasoning: bool = False  # mmlu: answers with their worked reasoning, not only " The answer is (X)."

    def __post_init__(self) -> None:
        if self.source == "mmlu" and self.texts > MMLU_QUESTIONS:
            raise ValueError(f"texts: MMLU has {MMLU_QUESTIONS} questions, got {self.texts}")
        if self.source != "mmlu" and self.reasoning:
            raise ValueError("reasoning: is for source: mmlu (review texts have no answers)")
        if not 0 <= self.share < self.shares:
            raise ValueError(f"share must be one of 0 .. {self.shares - 1} (shares: {self.shares}), got {self.share}")


@dataclass(frozen=True)
class TrainingSection:
    max_steps: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-2
    seed: int = 0
    # a DeepSpeed config (or the path of its JSON file), passed to TrainingArguments as is
    deepspeed: dict[str, Any] | str | None = None


@dataclass(frozen=True)
class DistillSection:
    """The model owner distils the emulator on public text before handing it out (``offsite.distill``).

    The public text here is the LAST ``texts`` reviews of the shuffled set, disjoint from the data owners' first
    ``data.texts`` as long as the two together stay under the set's 19,818 reviews."""

    texts: int = 400
    block: int = 64
    batch_size: int = 8
    epochs: int = 1
    lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("texts", "block", "batch_size", "epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class OffsiteJob:
    role: Role
    party_id: Identifier
    session: str
    parties: tuple[tuple[Role, Identifier], ...]
    offsite: OffsitePlan
    address: str = "127.0.0.1:50051"
    handout_address: str | None = None
    certs: str | None = "certs"
    insecure: bool = False  # plaintext (trusted networks only); takes --insecure on the command line as well
    model: dict[str, Any] | None = None
    model_path: str | None = None
    lora: LoraSettings | None = None
    seed: int = 0  # of the model owner's random weights
    output: str = "out"
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    fed: FedArguments = field(default_factory=FedArguments)  # when data owners sync (aggregate_strategy, _freq)
    distill: DistillSection | None = None  # model owner only: send a distilled emulator, not the layer drop

    def __post_init__(self) -> None:
        if self.model is None and self.model_path is None:
            raise ConfigError("give model (a config) or model_path")
        if self.distill is not None and self.role != "arbiter":
            raise ConfigError("distill: only the model owner (role arbiter) distils the emulator it hands out")

    def certs_for(self, insecure: bool = False) -> str | None:
        """The certificate folder for mutual TLS, or None for plaintext, which only ``--insecure`` on the command
        line turns on: a job file (which may come from someone else) cannot switch TLS off by itself, as with
        ``network.insecure`` of a job file (:func:`fedfleet.jobs.deploy.access_of`)."""
        if insecure:
            return None
        if self.insecure:
            raise ConfigError(
                "insecure: true asks for plaintext, but a job file cannot turn TLS off by itself: confirm with "
                "--insecure on the command line (`fedfleet offsite SIDE.yaml --insecure`, trusted networks only), "
                "or remove insecure: and set certs: to a folder from `fedfleet certs` to use mTLS"
            )
        if self.certs is None:
            raise ConfigError(
                "certs: is empty, which would mean plaintext: name the certificate folder (from `fedfleet certs`), "
                "or pass --insecure on the command line (trusted networks only)"
            )
        return self.certs

    def model_config(self) -> Any:
        from transformers import CONFIG_MAPPING, AutoConfig

        if self.model_path is not None:
            return AutoConfig.from_pretrained(self.model_path)
        cfg = dict(self.model or {})
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model: needs model_type (e.g. gpt2), or give model_path")
        if model_type not in CONFIG_MAPPING:
            known = list(CONFIG_MAPPING.keys())
            raise ConfigError(f"model.model_type: unknown {model_type!r}{did_you_mean(str(model_type), known)}")
        try:
            return AutoConfig.for_model(model_type, **cfg)
        except (TypeError, ValueError) as exc:  # a value the config class rejects
            raise ConfigError(f"model: {exc}") from None


def load_job(path: str | Path) -> OffsiteJob:
    """Read one side's YAML; errors name the file and the key path (``guest.yaml: training.max_step: ...``)."""
    return load(OffsiteJob, path)


def parse_job(raw: dict[str, Any], where: str = "") -> OffsiteJob:
    return parse(OffsiteJob, raw, where)
