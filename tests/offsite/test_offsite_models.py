"""fedfleet.offsite: the family table, the cut (adapters, uniform-stride emulator, extras) and the plug-in."""

import pytest
import torch
import transformers as T

from fedfleet.errors import ConfigError
from fedfleet.offsite import (
    AutoMainModel,
    AutoSubModel,
    FamilySpec,
    GPT2LMHeadMainModel,
    GPT2LMHeadSubModel,
    LlamaMainModel,
    LlamaSubModel,
    OffsiteTuningMainModel,
    OffsiteTuningSubModel,
    family_of,
    register_family,
    uniform_stride,
)
from fedfleet.offsite.families import FAMILIES

V = 64  # vocabulary of the tiny configs
SMALL = dict(hidden_size=16, num_attention_heads=2, vocab_size=V)
CONFIGS = {
    "gpt2": lambda n: T.GPT2Config(n_layer=n, n_embd=16, n_head=2, vocab_size=V, n_positions=32),
    "llama": lambda n: T.LlamaConfig(num_hidden_layers=n, intermediate_size=32, num_key_value_heads=1, **SMALL),
    "mistral": lambda n: T.MistralConfig(num_hidden_layers=n, intermediate_size=32, num_key_value_heads=1, **SMALL),
    "qwen2": lambda n: T.Qwen2Config(
        num_hidden_layers=n,
        intermediate_size=32,
        num_key_value_heads=1,
        use_sliding_window=True,
        **SMALL,
        max_window_layers=n // 2,
    ),
    "opt": lambda n: T.OPTConfig(
        num_hidden_layers=n, ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32, **SMALL
    ),
    "bloom": lambda n: T.BloomConfig(n_layer=n, n_head=2, hidden_size=16, vocab_size=V),
}


def test_uniform_stride_keeps_the_ends_and_survives_one_block():
    assert uniform_stride(10, 4) == (0, 3, 6, 9)
    assert uniform_stride(44, 16)[0] == 0 and uniform_stride(44, 16)[-1] == 43  # GPT2-XL 2-16-2
    assert uniform_stride(5, 5) == (0, 1, 2, 3, 4)
    assert uniform_stride(8, 1) == (3,)  # FATE-LLM divides by zero here
    assert uniform_stride(1, 1) == (0,)
    for bad in (0, 6):
        with pytest.raises(ConfigError, match="between 1 and the 5 middle"):
            uniform_stride(5, bad)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("emulator", [1, 4])  # one block, and the full middle (6 blocks - 1 - 1)
def test_extract_then_plug_in_is_exact_for_every_family(family, emulator):
    main = AutoMainModel(CONFIGS[family](6), emulator, 1, 1, seed=1)
    sub = AutoSubModel(main.model.config, emulator, 1, 1, seed=2)
    before = {n: p.detach().clone() for n, p in main.model.named_parameters()}
    sent = main.get_submodel_weights()
    sub.load_submodel_weights(sent)
    # the sub model holds exactly the owner's tensors, and nothing of the dropped middle blocks
    got = sub.get_submodel_weights()
    assert got.keys() == sent.keys() and all(torch.equal(got[k], sent[k]) for k in sent)
    n_sub = sum(p.numel() for p in sub.model.parameters())
    per_block = sum(p.numel() for p in main.blocks[0].parameters())
    outside = sum(p.numel() for p in main.model.parameters()) - 6 * per_block
    assert n_sub == main.submodel_param_count() == outside + (2 + emulator) * per_block
    adapter_ids = {id(p) for i in (0, 1 + emulator) for p in sub.blocks[i].parameters()}
    assert all(p.requires_grad == (id(p) in adapter_ids) for p in sub.model.parameters())  # only adapters train
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    if emulator == 4:  # the emulator is the whole middle: the sub model is the full model
        main.eval(), sub.eval()  # no dropout
        assert torch.equal(sub(input_ids=ids).logits, main(input_ids=ids).logits)
    # tune the adapters (here: perturb them), plug them in: exactly they change in the full model
    with torch.no_grad():
        for p in sub.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    tuned = sub.get_submodel_weights()
    main.load_submodel_weights(tuned)
    last = len(main.blocks) - 1
    for name, p in main.model.named_parameters():
        in_adapter = any(p is q for i in (0, last) for q in main.blocks[i].parameters())
        assert torch.equal(p, before[name]) != in_adapter, name
    assert all(
        torch.equal(a, b)
        for a, b in zip(main.get_adapter_top().parameters(), sub.get_adapter_top().parameters(), strict=True)
    )
    assert main.layers["emulator"] == ((1, 3) if emulator == 2 else ((2,) if emulator == 1 else (1, 2, 3, 4)))


def test_per_layer_settings_follow_the_chosen_blocks():
    cfg = T.Qwen2Config(
        num_hidden_layers=8,
        use_sliding_window=True,
        max_window_layers=4,
        **SMALL,
        intermediate_size=32,
        num_key_value_heads=1,
    )
    main = AutoMainModel(cfg, 2, 1, 1)
    sub = AutoSubModel(cfg, 2, 1, 1)
    assert main.layers["emulator"] == (1, 6)
    assert sub.model.config.layer_types == [cfg.layer_types[i] for i in (0, 1, 6, 7)]


def test_unknown_or_encoder_architectures_say_how_to_register():
    bert = T.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ConfigError, match=r"no Offsite-Tuning family .* 'bert'.*register_family\(FamilySpec"):
        AutoMainModel(bert, 1, 1, 0)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        family_of(T.T5Config())
    with pytest.raises(ConfigError, match="too few"):
        AutoMainModel(CONFIGS["gpt2"](2), 1, 1, 1)
    with pytest.raises(ConfigError, match="at least 1"):
        AutoMainModel(CONFIGS["gpt2"](4), 0, 1, 1)
    with pytest.raises(ConfigError, match="sub model needs 4"):
        WrongSub(2, 1, 1)


class WrongSub(OffsiteTuningSubModel):
    def get_base_model(self):
        return T.GPT2LMHeadModel(CONFIGS["gpt2"](5))


def test_registering_a_family_makes_it_cuttable():
    # GPT-J is not in the built-in table; one entry teaches it
    cfg = T.GPTJConfig(n_layer=4, n_embd=16, n_head=2, rotary_dim=4, vocab_size=V, n_positions=32)
    with pytest.raises(ConfigError, match="register"):
        AutoMainModel(cfg, 1, 1, 1)
    register_family(
        FamilySpec(
            "gptj", "transformer.h", ("transformer.wte",), "transformer.ln_f", "lm_head", ("q_proj", "v_proj"), "h"
        )
    )
    try:
        main = AutoMainModel(cfg, 1, 1, 1)
        sub = AutoSubModel(cfg, 1, 1, 1)
        sub.load_submodel_weights(main.get_submodel_weights())
        assert len(sub.blocks) == 3
    finally:
        del FAMILIES["gptj"]


def test_builtin_gpt2_and_llama_main_and_sub_models_with_fate_llm_signatures():
    for main_cls, sub_cls, cfg in (
        (GPT2LMHeadMainModel, GPT2LMHeadSubModel, CONFIGS["gpt2"](8)),
        (LlamaMainModel, LlamaSubModel, CONFIGS["llama"](8)),
    ):
        main = main_cls(cfg, 4, 2, 2)
        sub = sub_cls(cfg, emulator_layer_num=4, adapter_top_layer_num=2, adapter_bottom_layer_num=2)
        sub.load_submodel_weights(main.get_submodel_weights())
        assert len(sub.blocks) == 8 and len(main.get_emulator()) == 4
        assert main.layers["emulator"] == (2, 3, 4, 5)
        batch = {"input_ids": torch.randint(0, V, (1, 8))}
        main.eval(), sub.eval()
        assert torch.equal(sub(batch).logits, main(batch).logits)  # 4 of 4 middle blocks: the same network
        trainable = sum(p.numel() for p in sub.parameters() if p.requires_grad)
        assert trainable == sum(
            p.numel() for p in [*sub.get_adapter_top().parameters(), *sub.get_adapter_bottom().parameters()]
        )


class ChunkedExtras:
    """The tutorial's custom models: their own blocks accessor, embeddings shared in chunks."""

    def get_model_transformer_blocks(self, model):
        return model.transformer.h

    def get_additional_param_state_dict(self):
        wte = self.model.transformer.wte.weight.detach()
        return {f"wte_{i}": c for i, c in enumerate(wte.chunk(4))} | {"ln_f.weight": self.model.transformer.ln_f.weight}

    def load_additional_param_state_dict(self, weights):
        with torch.no_grad():
            self.model.transformer.wte.weight.copy_(torch.cat([weights[f"wte_{i}"] for i in range(4)]))
            self.model.transformer.ln_f.weight.copy_(weights["ln_f.weight"])


class ChunkedGPT2Main(ChunkedExtras, OffsiteTuningMainModel):
    def get_base_model(self):
        torch.manual_seed(0)
        return T.GPT2LMHeadModel(CONFIGS["gpt2"](6))


class ChunkedGPT2Sub(ChunkedExtras, OffsiteTuningSubModel):
    def get_base_model(self):
        return T.GPT2LMHeadModel(CONFIGS["gpt2"](4))


def test_subclasses_may_share_extras_their_own_way():
    main = ChunkedGPT2Main(2, 1, 1)
    sub = ChunkedGPT2Sub(2, 1, 1)
    weights = main.get_submodel_weights()
    assert "wte_3" in weights and not any(k.startswith("transformer.") for k in weights)
    sub.load_submodel_weights(weights)
    assert torch.equal(sub.model.transformer.wte.weight, main.model.transformer.wte.weight)
    assert not torch.equal(sub.model.transformer.wpe.weight, main.model.transformer.wpe.weight)  # not shared
