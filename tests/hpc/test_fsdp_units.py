"""FSDP party pieces that need no second process: the strategy table, config errors, precision by capability,
where a rank's shard sits, and two one-rank FSDP parties of an in-process federation."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.tensor import Replicate, Shard

from fedfleet.errors import ConfigError
from fedfleet.hpc import precision
from fedfleet.hpc.fsdp import SHARDINGS, FSDPConfig, blocks_of, sharding
from fedfleet.hpc.fsdp_access import exchanged_name, local_box
from fedfleet.sync import FedArguments, LocalFederation
from tests.hpc.fsdp_rank import Tokens, tiny_llama


def test_the_strategies_are_named_as_fsdp_users_know_them():
    assert set(SHARDINGS) == {"FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD"}
    assert sharding("hybrid_shard_zero2") is SHARDINGS["_HYBRID_SHARD_ZERO2"]  # xFFL's name, any case
    assert sharding(ShardingStrategy.HYBRID_SHARD) is SHARDINGS["HYBRID_SHARD"]  # torch's FSDP1 enum
    assert not SHARDINGS["SHARD_GRAD_OP"].reshard_after_forward and SHARDINGS["FULL_SHARD"].reshard_after_forward
    assert SHARDINGS["HYBRID_SHARD"].hybrid and not SHARDINGS["FULL_SHARD"].hybrid


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"strategy": "ZERO_SHARD"}, "fsdp.strategy"),
        ({"precision": "fp16"}, "fsdp.precision='fp16'"),
        ({"precision": "int8"}, "fsdp.precision"),
        ({"grad_accum_steps": 0}, "fsdp.grad_accum_steps"),
        ({"grad_accum_steps": 1.5}, "fsdp.grad_accum_steps"),
        ({"shard_size": 0}, "fsdp.shard_size"),
    ],
)
def test_a_bad_setting_is_refused_by_its_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        FSDPConfig(**kwargs)


def test_bf16_is_decided_by_the_device_not_a_cuda_version(monkeypatch):
    """A ROCm build reports no CUDA version; its GPU's capability alone decides (xFFL's recipe read the version)."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert precision.bf16_supported("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a V100
    assert not precision.bf16_supported("cuda")
    assert precision.compute_dtype("auto", "cuda") is torch.float32
    with pytest.raises(ConfigError, match="no native bf16"):
        precision.compute_dtype("bf16", "cuda")


def test_auto_precision_on_this_cpu_follows_its_instructions():
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert precision.bf16_supported("cpu") == native
    assert precision.compute_dtype("auto", "cpu") is (torch.bfloat16 if native else torch.float32)
    assert precision.compute_dtype("fp32", "cpu") is torch.float32
    policy = precision.mixed_precision_policy(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)  # fp32 reductions


def fake_param(shape, mesh_shape, coordinate, placements):
    mesh = SimpleNamespace(get_coordinate=lambda: coordinate, size=lambda d: mesh_shape[d])
    return SimpleNamespace(shape=torch.Size(shape), device_mesh=mesh, placements=placements)


@pytest.mark.parametrize("rows", range(0, 10))
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_a_ranks_box_is_its_chunk_as_torch_chunk_cuts_it(rows, parts):
    """Shards of ceil(n / k) rows, the last ones shorter or empty; a replicated mesh dim keeps every row."""
    reference = list(torch.arange(rows).chunk(parts)) if rows else []
    for index in range(parts):
        for mesh_shape, coordinate, placements in [
            ((parts,), (index,), (Shard(0),)),
            ((2, parts), (1, index), (Replicate(), Shard(0))),  # a hybrid mesh: replicas across, shards within
        ]:
            box = local_box(fake_param((rows, 3), mesh_shape, coordinate, placements))
            expected = reference[index].tolist() if index < len(reference) else []
            assert list(range(rows))[box[0]] == expected and box[1] == slice(0, 3)


def test_the_exchanged_names_are_the_models_own():
    assert exchanged_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )


def test_the_blocks_of_a_hugging_face_model_and_of_any_module():
    llama = tiny_llama(0)
    assert blocks_of(llama, None) == list(llama.model.layers)  # from _no_split_modules
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3))
    assert len(blocks_of(plain, None)) == 3  # the longest ModuleList's children
    with pytest.raises(ConfigError, match=r"fsdp\.wrap"):
        blocks_of(llama, ("GPT2Block",))


def test_two_one_rank_fsdp_parties_in_process_hold_the_weighted_mean():
    """A LocalFederation of two FSDPParty threads (a process group of one rank, no torchrun variables): after each
    sync both hold the weighted mean of what they sent, and a second seeded run gives the same bits."""
    from fedfleet.hpc.fsdp_party import FSDPParty

    def run() -> tuple[list, list, list]:
        federation = LocalFederation(2, timeout=60)
        sent: list[list[dict]] = [[], []]
        got: list[list[dict]] = [[], []]
        parties = []
        for i in range(2):
            party = FSDPParty(
                federation.context(i), tiny_llama(i), FedArguments("epoch", 1), FSDPConfig(precision="fp32")
            )
            sync = party.driver.sync

            def recorded(weight, stats, metrics=None, i=i, party=party, sync=sync):
                sent[i].append({n: p.full_tensor().clone() for n, p in party.model.named_parameters()})
                going = sync(weight, stats, metrics)
                got[i].append({n: p.full_tensor().clone() for n, p in party.model.named_parameters()})
                return going

            party.driver.sync = recorded
            parties.append(party)
        errors: list[BaseException] = []

        def train(i: int) -> None:
            try:
                parties[i].fit(Tokens(8 + 8 * i, seed=i), epochs=2, batch_size=4, lr=5e-3, seed=i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        parties[0].destroy()  # the first party started the process group
        return sent, got, [p.history for p in parties]

    try:
        sent, got, history = run()
        assert [r.weight for r in history[0]] == [8.0, 8.0] and [r.weight for r in history[1]] == [16.0, 16.0]
        for r in range(2):
            for name, a in sent[0][r].items():
                mean = a.double() * (8 / 24) + sent[1][r][name].double() * (16 / 24)
                for i in range(2):
                    assert torch.allclose(got[i][r][name].double(), mean, rtol=0, atol=2e-6), (i, r, name)
        again = run()[1]
        assert all(torch.equal(got[1][-1][n], again[1][-1][n]) for n in got[1][-1])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def one_step(config: FSDPConfig, batch_size: int, evaluate_first: bool = False) -> dict[str, torch.Tensor]:
    """The params after one SGD step on the same 8 examples, through FSDPParty.fit (a party of one rank);
    ``evaluate_first``: a forward under no_grad before fit, as a script measuring its starting loss does."""
    from fedfleet.hpc.fsdp_party import FSDPParty

    party = FSDPParty(LocalFederation(1, timeout=60).context(0), tiny_llama(0), FedArguments("epoch", 1), config)
    try:
        if evaluate_first:
            with torch.no_grad():
                party.model(input_ids=Tokens(2, seed=5).ids)
        sgd = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731 (linear in the gradient, unlike Adam)
        party.fit(Tokens(8, seed=3), epochs=1, batch_size=batch_size, optimizer=sgd, max_steps=1)
        assert [r.weight for r in party.history] == [8.0]
        return {n: p.full_tensor().clone() for n, p in party.model.named_parameters()}
    finally:
        party.destroy()


def test_accumulated_micro_batches_and_checkpointed_activations_give_the_same_step():
    try:
        whole = one_step(FSDPConfig(precision="fp32"), batch_size=8)
        accumulated = one_step(FSDPConfig(precision="fp32", grad_accum_steps=2), batch_size=4)
        recomputed = one_step(FSDPConfig(precision="fp32", activation_checkpointing=True), batch_size=8)
        start = dict(tiny_llama(0).named_parameters())
        assert any(not torch.equal(whole[n], start[n]) for n in whole)  # it stepped
        for name, value in whole.items():
            assert torch.allclose(accumulated[name], value, rtol=0, atol=1e-6), name
            assert torch.allclose(recomputed[name], value, rtol=0, atol=1e-6), name
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_an_evaluation_before_fit_does_not_stop_the_embeddings_and_head_from_training():
    # FSDP2 leaves the root unit's params gathered after a forward without backward; an optimizer built from
    # model.parameters() then held those temporary tensors, and the embeddings and head never trained
    try:
        plain = one_step(FSDPConfig(precision="fp32"), batch_size=8)
        evaluated = one_step(FSDPConfig(precision="fp32"), batch_size=8, evaluate_first=True)
        start = dict(tiny_llama(0).named_parameters())
        assert not torch.equal(evaluated["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
        for name, value in plain.items():
            assert torch.equal(evaluated[name], value), name
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_exchange_is_sharded_only_where_the_context_can_and_refuses_what_needs_the_whole_update(tmp_path):
    """exchange='sharded' over a context whose syncs go through rank 0 is refused by name; over a folder it is the
    default, and a party-side clip (which needs the whole update on one rank) is refused before any training."""
    from fedfleet.hpc.fsdp_party import FSDPParty
    from fedfleet.runtime.files import FileContext
    from fedfleet.transforms.clip import ClipNorm

    config = FSDPConfig(precision="fp32", device="cpu")
    local = LocalFederation(1, timeout=60).context(0)
    for exchange, match in [("sharded", "exchange='gathered'"), ("scattered", "auto, sharded, gathered")]:
        with pytest.raises(ConfigError, match=match):
            FSDPParty(local, tiny_llama(0), FedArguments("epoch", 1), config, exchange=exchange)
        if dist.is_initialized():
            dist.destroy_process_group()
    ctx = FileContext(tmp_path / "exchange", "guest-9999", "s1", timeout=5, poll_s=0.1)
    party = FSDPParty(ctx, tiny_llama(0), FedArguments("epoch", 1), config, update_transforms=[ClipNorm(1.0)])
    try:
        assert party.exchange == "sharded" and not hasattr(party.access, "params")  # no full-size buffer
        with pytest.raises(ConfigError, match="update_transforms need the whole update"):
            party.fit(Tokens(8, seed=3), epochs=1, batch_size=4)
    finally:
        party.destroy()
