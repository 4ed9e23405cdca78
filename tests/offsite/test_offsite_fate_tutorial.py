"""FATE-LLM's tutorial classes (examples/offsite/fate_tutorial.py: only their imports changed) through the
documented calls, over loopback gRPC: the owner gets only the main model, as in FATE, and a data owner whose owner
gave up stops with the owner's reason instead of redialling."""

import threading
import time

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from fedfleet.errors import ConfigError
from fedfleet.hf import FedAVGArguments, create_context
from fedfleet.hf.data import QaDataset, Seq2SeqCollator, gpt2_tokenizer, mmlu_questions
from fedfleet.offsite import OffsiteTuningMainModel, OffsiteTuningSubModel
from fedfleet.offsite.session import OffsiteTuningClient, OffsiteTuningServer
from fedfleet.runtime.grpc.party import SessionFailed
from tests.grpc_jobs import free_port
from tests.offsite.fate_tutorial import GPT2LMHeadMainModel, GPT2LMHeadSubModel
from tests.offsite_helpers import tiny_config, training_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A save_pretrained folder, the tutorial's model_name_or_path (it names the hub's 'gpt2')."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(6)).save_pretrained(path)
    return str(path)


class CountingSub(GPT2LMHeadSubModel):
    """The tutorial's sub model, counting the calls of its forward."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def contexts(parties, session):
    address, handout = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    ctxs = {role: create_context((role, pid), parties, session, address, insecure=True) for role, pid in parties}
    return ctxs, handout


def in_thread(fn):
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def qa_data(tok, n=32):
    return QaDataset(tok, mmlu_questions(reasoning=False)[:n], max_length=48)


def test_the_tutorial_classes_hand_out_ten_pieces_and_join_them_back(gpt2_dir):
    main = GPT2LMHeadMainModel(gpt2_dir, 2, 1, 1)
    sub = GPT2LMHeadSubModel(gpt2_dir, 2, 1, 1)
    sent = main.get_submodel_weights()
    extras = [k for k in sent if not k.startswith(("adapter_", "emulator."))]
    assert extras == [
        "last_ln_f.weight",
        "last_ln_f.bias",
        *(f"wte{i}" for i in range(10)),
        *(f"wpe{i}" for i in range(10)),
    ]
    sub.load_submodel_weights({k: v.clone() for k, v in sent.items()})
    for name in ("wte", "wpe", "ln_f"):
        mine, theirs = getattr(sub.model.transformer, name), getattr(main.model.transformer, name)
        assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters(), strict=True))


def test_the_owner_needs_only_the_main_model_and_the_sub_models_class_is_honoured(tmp_path, gpt2_dir):
    parties = [("guest", "1"), ("arbiter", "2")]
    ctxs, handout = contexts(parties, "tutorial")
    main = GPT2LMHeadMainModel(gpt2_dir, 2, 1, 1)
    middle = {n: p.detach().clone() for n, p in main.model.named_parameters() if ".h.0." not in n and ".h.5." not in n}
    server = OffsiteTuningServer(ctx=ctxs["arbiter"], model=main, handout_at=handout, aggregate_model=True)
    owner, owner_errors = in_thread(server.train)

    tok = gpt2_tokenizer()
    sub = CountingSub(gpt2_dir, 2, 1, 1, partial_weight_decay=0.01)
    client = OffsiteTuningClient(
        ctx=ctxs["guest"],
        model=sub,
        aggregate_model=True,
        handout_at=handout,
        fed_args=FedAVGArguments(aggregate_strategy="step", aggregate_freq=2),
        training_args=training_args(tmp_path, steps=4, lr=1e-3),
        train_set=qa_data(tok),
        data_collator=Seq2SeqCollator.for_tokenizer(tok),
        tokenizer=tok,
    )
    assert torch.equal(sub.model.transformer.wte.weight, main.model.transformer.wte.weight)  # 10 pieces joined
    client.train()
    owner.join(60)
    assert not owner.is_alive() and not owner_errors, owner_errors
    assert client.fed_sync.syncs == 2
    assert sub.calls == 4  # every step went through the class's forward
    # the class's parameters() groups: FATE's rule as it wrote it (its "layer_norm.weight" is not GPT-2's ln_*)
    decay, no_decay = client.optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    names = {id(p): n for n, p in sub.model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"bias"}
    trainable = {id(p) for p in sub.model.parameters() if p.requires_grad}
    assert {id(p) for g in (decay, no_decay) for p in g["params"]} == trainable
    # the plug-in: the owner's adapters are the data owner's tuned ones, the rest of its model as it was
    tuned = sub.get_submodel_weights()
    assert torch.equal(main.blocks[0].attn.c_attn.weight, tuned["adapter_bottom.0.attn.c_attn.weight"])
    assert torch.equal(main.blocks[5].mlp.c_fc.weight, tuned["adapter_top.0.mlp.c_fc.weight"])
    now = dict(main.model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in middle.items())


class Stack(nn.Module):
    """A model of the user's own, no Hugging Face config: the owner cannot derive the data owners' skeleton."""

    def __init__(self, n):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))


class OwnMain(OffsiteTuningMainModel):
    def get_base_model(self):
        return Stack(6)

    def get_model_transformer_blocks(self, model):
        return model.blocks


class OwnSub(OwnMain, OffsiteTuningSubModel):
    def get_base_model(self):
        return Stack(4)


def test_an_owner_that_cannot_derive_the_sub_model_says_to_give_sub():
    ctx = create_context(("arbiter", "2"), [("guest", "1"), ("arbiter", "2")], "own", insecure=True)
    with pytest.raises(ConfigError, match=r"cannot for this Stack: .*Give OffsiteTuningServer\(\.\.\., sub="):
        OffsiteTuningServer(ctx, model=OwnMain(2, 1, 1))
    server = OffsiteTuningServer(ctx, model=OwnMain(2, 1, 1), sub=OwnSub(2, 1, 1))
    assert sorted(server.handout.spec.names)[:2] == ["adapter_bottom.0.bias", "adapter_bottom.0.weight"]


def test_a_data_owner_stops_with_the_reason_its_owner_gave_up(gpt2_dir):
    parties = [("guest", "1"), ("host", "2"), ("arbiter", "3")]
    ctxs, handout = contexts(parties, "gives-up")
    server = OffsiteTuningServer(ctxs["arbiter"], GPT2LMHeadMainModel(gpt2_dir, 2, 1, 1), handout_at=handout,
                                 wait_timeout=3)  # fmt: skip
    owner, owner_errors = in_thread(server.train)
    tok = gpt2_tokenizer()
    start = time.monotonic()
    with pytest.raises(SessionFailed, match=r"ended session gives-up/handout: .*host-2 did not connect within 3 s"):
        OffsiteTuningClient(  # the host is never started
            ctxs["guest"],
            GPT2LMHeadSubModel(gpt2_dir, 2, 1, 1),
            handout_at=handout,
            train_set=qa_data(tok, 4),
            data_collator=Seq2SeqCollator.for_tokenizer(tok),
        )
    assert time.monotonic() - start < 30  # told, not redialling
    owner.join(30)
    assert "host-2 did not connect" in str(owner_errors[0])


@pytest.mark.slow
def test_the_example_script_runs_the_tutorial_as_three_processes(tmp_path):
    import json
    import subprocess
    import sys

    from tests.offsite.fate_tutorial import PATH

    command = [sys.executable, str(PATH), "--insecure", "--work", str(tmp_path), "--steps", "4", "--questions", "24",
               "--held-out", "8"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"')]
    assert sorted(line["role"] for line in lines) == ["guest-9999", "host-10000", "owner"]
    assert all(line["syncs"] == 1 for line in lines if line["role"] != "owner")
    assert (tmp_path / "plugged_in" / "config.json").is_file()
