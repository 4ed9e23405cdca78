"""fedfleet.hf.ds_config: DeepSpeed config presets for TrainingArguments(deepspeed=...) (no DeepSpeed needed), and
a config's numbers reconciled with the TrainingArguments (transformers needs DeepSpeed installed to read one)."""

import copy
import importlib.util
import json
import logging

import pytest

from fedfleet.errors import ConfigError
from fedfleet.hf.ds_config import load_deepspeed_config, reconcile, zero_config
from tests.hf_parties import tiny_gpt2


def test_presets_leave_the_trainer_s_numbers_to_the_trainer():
    z2 = zero_config(2)
    assert z2["zero_optimization"] == {"stage": 2}
    assert z2["train_micro_batch_size_per_gpu"] == z2["gradient_accumulation_steps"] == "auto"
    assert "optimizer" not in z2  # the Trainer's own torch optimizer
    assert zero_config(3)["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = zero_config(2, offload_optimizer=True)
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert off["optimizer"]["params"]["lr"] == "auto"  # DeepSpeedCPUAdam, with the Trainer's learning rate


def test_a_spec_is_a_preset_or_a_json_file(tmp_path):
    assert load_deepspeed_config("zero1-offload") == zero_config(1, offload_optimizer=True)
    mine = tmp_path / "ds.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    assert load_deepspeed_config(str(mine))["zero_optimization"]["overlap_comm"] is False
    with pytest.raises(ConfigError, match="neither a preset"):
        load_deepspeed_config("zero9")
    with pytest.raises(ConfigError, match="ZeRO stage 4"):
        zero_config(4)
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        zero_config(0, offload_optimizer=True)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

# FATE-LLM's GPT-2 tutorial config, with a WarmupLR of its own numbers as users write it
FATE = {
    "train_micro_batch_size_per_gpu": 16,
    "train_batch_size": "auto",
    "optimizer": {"type": "Adam", "params": {"lr": 5e-4}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 500}},
    "fp16": {"enabled": False},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8},
}


def args_with(config, tmp_path, **overrides):
    from transformers import TrainingArguments

    settings = dict(per_device_train_batch_size=8, learning_rate=2e-3, max_steps=10, use_cpu=True, report_to=[])
    return TrainingArguments(output_dir=str(tmp_path), deepspeed=copy.deepcopy(config), **{**settings, **overrides})


@needs_deepspeed
def test_numbers_that_disagree_with_the_training_arguments_were_refused_by_transformers(tmp_path):
    args = args_with(FATE, tmp_path)
    with pytest.raises(ValueError, match=r"warmup_max_lr=3e-05 vs hf learning_rate=0\.002"):
        args.hf_deepspeed_config.trainer_config_finalize(args, tiny_gpt2(0), 10)  # what train() does first


@needs_deepspeed
def test_reconcile_replaces_each_disagreeing_number_by_auto_and_says_so(tmp_path, caplog):
    args = args_with(FATE, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedfleet.hf"):
        notes = reconcile(args)
    assert len(notes) == 4 and caplog.messages == notes
    assert notes[0].startswith("DeepSpeed config train_micro_batch_size_per_gpu=16 replaced by 'auto'")
    assert "(per_device_train_batch_size=8)" in notes[0]
    assert any("scheduler.params.warmup_max_lr=3e-05 replaced by 'auto' (learning_rate=0.002)" in n for n in notes)
    assert any("warmup_num_steps=500 replaced by 'auto' (warmup_steps=1)" in n for n in notes)
    assert "to train with 500, give it to TrainingArguments (warmup_steps)" in notes[-1]
    hf = args.hf_deepspeed_config
    hf.trainer_config_finalize(args, tiny_gpt2(0), 10)  # transformers' own check now passes
    assert hf.config["train_micro_batch_size_per_gpu"] == 8 and hf.config["train_batch_size"] == 8
    assert hf.config["optimizer"]["params"]["lr"] == 2e-3
    assert hf.config["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 2e-3, "warmup_num_steps": 1}
    assert args.deepspeed["scheduler"]["params"]["warmup_num_steps"] == 500  # the user's own dict is untouched


@needs_deepspeed
def test_numbers_that_agree_are_left_as_they_are(tmp_path):
    mine = copy.deepcopy(FATE)
    mine["train_micro_batch_size_per_gpu"] = 8
    mine["optimizer"]["params"]["lr"] = 2e-3
    mine["scheduler"]["params"].update(warmup_max_lr=2e-3, warmup_num_steps=5)
    args = args_with(mine, tmp_path, warmup_steps=5)
    assert reconcile(args) == []
    assert args.hf_deepspeed_config.config["scheduler"]["params"]["warmup_num_steps"] == 5
    assert reconcile(args_with(zero_config(2), tmp_path)) == []  # the presets leave everything "auto"


@needs_deepspeed
def test_a_precision_that_disagrees_is_an_error_naming_the_key(tmp_path):
    mine = {**zero_config(2), "fp16": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"fp16.enabled=True but TrainingArguments fp16=False.*give both the same"):
        reconcile(args_with(mine, tmp_path))
