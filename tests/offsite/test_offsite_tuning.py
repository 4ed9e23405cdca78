"""Adapter-only tuning of sub models by two data owners (in-process FedAvg), and the paper's evaluation table."""

import pytest
import torch

from fedfleet.hf import FedArguments, LocalFederation
from fedfleet.hf.data import gpt2_tokenizer, mmlu_questions
from fedfleet.offsite import AutoMainModel, AutoSubModel
from fedfleet.offsite.evaluate import ROWS, choice_accuracy, markdown, perplexity, table
from fedfleet.offsite.tuning import LoraSettings, merge_lora, tunable
from tests.offsite_helpers import losses, owner_blocks, tiny_config, train_in_threads


def frozen_state(sub):
    return {n: p.detach().clone() for n, p in sub.model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_two_data_owners_tune_adapters_only_and_fedavg_them(tmp_path, lora):
    main = AutoMainModel(tiny_config(6), emulator_layer_num=2, adapter_top_layer_num=1, adapter_bottom_layer_num=1)
    handout = main.get_submodel_weights()
    subs = [AutoSubModel(main.model.config, 2, 1, 1, seed=10 + i) for i in range(2)]
    for sub in subs:
        sub.load_submodel_weights(handout)
    frozen = [frozen_state(s) for s in subs]
    adapters_before = {k: v.clone() for k, v in handout.items() if k.startswith("adapter")}
    models = [tunable(s, lora) for s in subs]
    trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
    assert all(("lora_" in n) == (lora is not None) for n in trainable)
    data, held_out = owner_blocks(2)
    ppl_before = perplexity(subs[0].model, held_out)
    fed = LocalFederation(2)
    clients = train_in_threads(models, [fed.context(i) for i in range(2)], data, tmp_path, 12, FedArguments("step", 4))
    assert fed.rounds == 3  # steps 4, 8, 12: adapters aggregated every round (aggregate_model=True)
    for client in clients:
        first, last = losses(client)[:3], losses(client)[-3:]
        assert sum(last) < sum(first) - 0.6  # the training loss falls (means of 3 steps, by > 0.2 nats)
    # held out: a random model's frozen embeddings cap what adapters can learn, but they clearly do, and the
    # tuned model predicts better than uniform guessing over the 50257 tokens
    ppl_after = perplexity(models[0], held_out)
    assert ppl_after < 0.7 * ppl_before and ppl_after < 50257
    for sub, model, before in zip(subs, models, frozen, strict=True):
        merge_lora(model)
        # the emulator and extras (and, under LoRA, the adapters' base weights before merging) never moved
        if lora is None:
            now = {n: p for n, p in sub.model.named_parameters() if not p.requires_grad}
            assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)
        sent = sub.get_submodel_weights()
        assert all(torch.equal(sent[k], handout[k]) for k in handout if not k.startswith("adapter"))
        assert not all(torch.equal(sent[k], adapters_before[k]) for k in adapters_before)  # adapters were tuned
    a, b = (s.get_submodel_weights() for s in subs)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)  # both hold the aggregate
    # the plug-in: the tuned adapters go into the full model, whose middle blocks stay the originals
    middle = [p.detach().clone() for i in range(1, 5) for p in main.blocks[i].parameters()]
    main.load_submodel_weights(a)
    after = [p for i in range(1, 5) for p in main.blocks[i].parameters()]
    assert all(torch.equal(x, y) for x, y in zip(middle, after, strict=True))
    assert torch.equal(main.blocks[5].mlp.c_fc.weight, a["adapter_top.0.mlp.c_fc.weight"])
    assert perplexity(main.model, held_out) < perplexity(AutoMainModel(tiny_config(6), 2, 1, 1).model, held_out)


def test_the_paper_table_on_a_held_out_split(tmp_path):
    cfg = tiny_config(6)
    main = AutoMainModel(cfg, 2, 1, 1)
    sub = AutoSubModel(cfg, 2, 1, 1)
    sub.load_submodel_weights(main.get_submodel_weights())
    zero_shot = AutoSubModel(cfg, 2, 1, 1)
    zero_shot.load_submodel_weights(main.get_submodel_weights())
    data, held_out = owner_blocks(1)
    fed = LocalFederation(1)
    train_in_threads([tunable(sub)], [fed.context(0)], data, tmp_path, 10, FedArguments("epoch", 1))
    full = AutoMainModel(cfg, 2, 1, 1)  # the same seed: the untuned full model
    main.load_submodel_weights(sub.get_submodel_weights())
    tok = gpt2_tokenizer()
    questions = [q for q in mmlu_questions(reasoning=False) if q.letter][:6]
    rows = table(
        {
            "full zero-shot": full.model,
            "emulator zero-shot": zero_shot.model,
            "emulator fine-tuned": sub.model,
            "plug-in": main.model,
        },
        {"ppl": lambda m: perplexity(m, held_out), "mmlu_acc": lambda m: choice_accuracy(m, tok, questions, 48)},
    )
    assert list(rows) == list(ROWS)
    assert rows["emulator fine-tuned"]["ppl"] < 0.7 * rows["emulator zero-shot"]["ppl"]
    assert rows["plug-in"]["ppl"] < rows["full zero-shot"]["ppl"]
    assert all(0.0 <= r["mmlu_acc"] <= 1.0 for r in rows.values())
    assert markdown(rows).splitlines()[2].startswith("| full zero-shot | ")
