"""FATE-LLM's spellings run as they are written: FedAVGClient, FedAVGServer, FedAVGArguments,
create_context(federation_session_id=...), val_set=; its engine keywords are refused with fedfleet's."""

import pytest
from transformers import TrainingArguments

import fedfleet.hf as hf
from fedfleet.errors import ConfigError
from tests.hf_parties import tiny_gpt2

PARTIES = [("guest", "1"), ("host", "2"), ("arbiter", "3")]


def test_fates_class_names_are_fedfleets_classes():
    assert hf.FedAVGClient is hf.FedAvgClient
    assert hf.FedAVGServer is hf.FedAvgServer
    assert hf.FedAVGArguments(aggregate_strategy="step", aggregate_freq=2) == hf.FedArguments("step", 2)


def test_create_context_takes_fates_session_keyword_and_refuses_its_engines():
    ctx = hf.create_context(("guest", "1"), PARTIES, federation_session_id="s-fate", insecure=True)
    assert ctx.session_id == "s-fate"
    with pytest.raises(ConfigError, match=r"federation_engine is FATE-LLM's; .*arbiter_address="):
        hf.create_context(("guest", "1"), PARTIES, "s", federation_engine="rabbitmq")
    with pytest.raises(ConfigError, match="session_id="):
        hf.create_context(("guest", "1"), PARTIES)
    with pytest.raises(TypeError, match="sesion_id"):
        hf.create_context(("guest", "1"), PARTIES, sesion_id="s")


def test_val_set_is_the_eval_set(tmp_path):
    ctx = hf.LocalFederation(1).context(0)
    train, val = [{"input_ids": [1, 2], "labels": 0}], [{"input_ids": [3, 4], "labels": 1}]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = hf.FedAVGClient(ctx=ctx, model=tiny_gpt2(0), training_args=args, train_set=train, val_set=val)
    assert trainer.eval_dataset is val
    with pytest.raises(ConfigError, match="eval_set or val_set"):
        hf.FedAVGClient(ctx=ctx, model=tiny_gpt2(0), training_args=args, train_set=train, val_set=val, eval_set=val)
