"""A sub model class's own ``forward``, ``parameters()`` groups and ``partial_weight_decay`` are what a data
owner's OffsiteTuningClient trains with, or are refused before the hand-out: never accepted and left unused."""

from types import SimpleNamespace

import pytest
import torch

from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, LocalFederation
from fedfleet.offsite import AutoMainModel, GPT2LMHeadSubModel
from fedfleet.offsite.session import OffsiteTuningClient
from fedfleet.offsite.tuning import LoraSettings
from fedfleet.offsite.wrapper import decay_rate, own_groups
from tests.offsite.fate_tutorial import GPT2LMHeadSubModel as TutorialSub
from tests.offsite_helpers import owner_blocks, tiny_config, training_args

pytestmark = pytest.mark.usefixtures("one_thread")


def loaded(sub):
    sub.load_submodel_weights(AutoMainModel(tiny_config(6), 2, 1, 1).get_submodel_weights())
    return sub


def client(sub, tmp_path, steps=2, **kwargs):
    (data,), _ = owner_blocks(1, texts=60, held_out=8)
    return OffsiteTuningClient(
        LocalFederation(1).context(0),
        sub,
        handout=False,  # in-process: the sub model holds the owner's weights already
        fed_args=FedArguments("step", steps),
        training_args=training_args(tmp_path, steps),
        train_set=data,
        **kwargs,
    )


def test_partial_weight_decay_decays_the_adapters_weights_only(tmp_path):
    sub = loaded(GPT2LMHeadSubModel(tiny_config(6), 2, 1, 1, partial_weight_decay=0.1))
    trainer = client(sub, tmp_path)
    trainer.train()
    decay, rest = trainer.optimizer.param_groups
    names = {id(p): n for n, p in sub.model.named_parameters()}
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)
    decayed, kept = ({names[id(p)] for p in g["params"]} for g in (decay, rest))
    assert decayed and all(n.endswith(".weight") and ".ln_" not in n for n in decayed)  # GPT-2's norms are ln_*
    assert kept and all(n.endswith(".bias") or ".ln_" in n for n in kept)
    trainable = {id(p) for p in sub.model.parameters() if p.requires_grad}
    assert {id(p) for g in (decay, rest) for p in g["params"]} == trainable


class KeywordForward(GPT2LMHeadSubModel):
    """A forward that takes the batch as keywords and changes the loss: the step must see its loss."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = self.model(input_ids=input_ids, labels=labels, **kwargs)
        out.loss = out.loss * 0.0 + 123.0  # a constant: no gradient, and a loss no model gives
        return out


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2)])
def test_a_keyword_forward_is_what_the_steps_call(tmp_path, lora):
    trainer = client(loaded(KeywordForward(tiny_config(6), 2, 1, 1)), tmp_path, lora=lora)
    trainer.train()
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == [123.0, 123.0]


@pytest.fixture
def gpt2_folder(tmp_path):
    tiny_config(6).save_pretrained(tmp_path / "gpt2")  # the tutorial's sub model reads only the config
    return str(tmp_path / "gpt2")


def test_what_cannot_be_honoured_is_refused_with_the_fix(tmp_path, gpt2_folder):
    args = training_args(tmp_path)
    groups = TutorialSub(gpt2_folder, 2, 1, 1, partial_weight_decay=0.01)
    with pytest.raises(ConfigError, match="which LoRA freezes"):
        own_groups(groups, LoraSettings(r=2), args)
    ds = SimpleNamespace(deepspeed={"optimizer": {"type": "AdamW"}}, weight_decay=0.0)
    with pytest.raises(ConfigError, match="DeepSpeed config has an 'optimizer' section"):
        own_groups(groups, None, ds)
    plain = GPT2LMHeadSubModel(tiny_config(6), 2, 1, 1, partial_weight_decay="0.1")
    with pytest.raises(ConfigError, match="partial_weight_decay must be None or a number"):
        decay_rate(plain, None, args)
    plain.partial_weight_decay = 0.1
    with pytest.raises(ConfigError, match=r"TrainingArguments\(weight_decay=0.2\) both set the decay"):
        decay_rate(plain, None, SimpleNamespace(weight_decay=0.2))
    with pytest.raises(ConfigError, match="DeepSpeed config"):
        decay_rate(plain, None, ds)
    assert decay_rate(plain, LoraSettings(r=2), args) == 0.1  # LoRA's factors are weights: they decay
    # FATE's groups with partial_weight_decay=None: its parameters() is torch's, the Trainer's optimizer as usual
    assert own_groups(TutorialSub(gpt2_folder, 2, 1, 1), None, args) is None
    # a refusal comes before anything is waited for
    with pytest.raises(ConfigError, match="which LoRA freezes"):
        client(groups, tmp_path, lora=LoraSettings(r=2))


def test_a_class_that_asks_for_nothing_trains_with_the_trainers_own_optimizer_lora_too(tmp_path):
    torch.manual_seed(0)
    sub = loaded(GPT2LMHeadSubModel(tiny_config(6), 2, 1, 1))
    trainer = client(sub, tmp_path, lora=LoraSettings(r=2))
    trainer.train()
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
