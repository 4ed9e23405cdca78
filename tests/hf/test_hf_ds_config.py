"""fedfleet.hf.ds_config: DeepSpeed config presets for TrainingArguments(deepspeed=...) (no DeepSpeed needed)."""

import json

import pytest

from fedfleet.errors import ConfigError
from fedfleet.hf.ds_config import load_deepspeed_config, zero_config


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
