"""``fedfleet merge`` (fedfleet.hpc.merge): three tiny LLaMA checkpoints in fp32, bf16 and fp16, one file or
shards, merged against a float64 reference; manifests; the server optimisers across a restart; every refusal
gives one message and leaves no output; the CLI end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedfleet.core.params import FlatParams
from fedfleet.core.update import Aggregate
from fedfleet.hpc.merge import (
    MANIFEST,
    STATE_PREFIX,
    MergeError,
    blocks,
    build_server_opt,
    merge_checkpoints,
    read_manifest,
    state_file,
    write_manifest,
)
from fedfleet.strategy import build_strategy
from tests.cli_runner import fedfleet

LAYOUTS = [(torch.float32, None), (torch.bfloat16, "20KB"), (torch.float16, "50KB")]  # one file, 3 and 2 shards
U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def save_llama(path: Path, seed: int, dtype: torch.dtype, shard: str | None) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    with torch.no_grad():  # norms start at 1 in every seed: make every tensor differ between checkpoints
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(path, **({} if shard is None else {"max_shard_size": shard}))
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as the test reads them (whole, in float64): the reference side."""
    files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.name.startswith(STATE_PREFIX):
            out.update({k: v.double() for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return [save_llama(root / f"party{i}", i, dt, shard) for i, (dt, shard) in enumerate(LAYOUTS)]


def reference(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    loaded = [tensors(p) for p in paths]
    return {k: sum(w / total * t[k] for w, t in zip(weights, loaded, strict=True)) for k in loaded[0]}


def assert_within_rounding(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype):
    assert out.keys() == ref.keys()
    for k, r in ref.items():
        # the output dtype's rounding of the exact mean, plus fp32 accumulation over three inputs
        bound = U[dtype] * r.abs() + 8 * 2.0**-24 * r.abs().max() + 1e-12
        err = (out[k] - r).abs()
        assert bool((err <= bound).all()), f"{k}: max error {float(err.max()):.3g}"


def no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a temp folder was left behind"


# -- the merge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("block", ["whole", "small"])
def test_merge_of_three_dtypes_and_layouts_equals_float64_mean(three, tmp_path, dtype, block, monkeypatch):
    from transformers import AutoModelForCausalLM

    if block == "small":  # every tensor in several row blocks, as the big tensors of a real model are
        monkeypatch.setattr(blocks, "BLOCK", 100)
    out = tmp_path / "merged"
    result = merge_checkpoints(out, three, weights=[1, 2, 3], dtype=dtype, max_shard_size="30KB")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    assert result.weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    merged = tensors(out)
    assert_within_rounding(merged, reference(three, [1, 2, 3]), torch_dtype)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    with safe_open(str(out / shards[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {{"bf16": "BF16", "fp16": "F16"}.get(dtype, "F32")}  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch_dtype
    for name, p in model.state_dict().items():
        assert torch.equal(p.double(), merged[name]), name
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_auto_dtype_keeps_the_first_checkpoints_and_one_shard_is_model_safetensors(three, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoints(out, [three[1], three[0]], weights=[1, 1])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        MANIFEST,
        "generation_config.json",
        "model.safetensors",
    ]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    sums = read_manifest(out).sha256
    assert set(sums) == {"config.json", "generation_config.json", "model.safetensors"}


def test_manifests_give_the_weights_and_their_sums_are_checked(three, tmp_path):
    parties = []
    for i, p in enumerate(three):  # copies: the module's checkpoints stay untouched
        dst = tmp_path / p.name
        dst.mkdir()
        for f in p.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        write_manifest(dst, tokens=1000 * (i + 1), samples=10 * (3 - i), party=f"party-{i}")
        parties.append(dst)
    by_tokens = merge_checkpoints(tmp_path / "tokens", parties)
    assert by_tokens.weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert_within_rounding(tensors(tmp_path / "tokens"), reference(three, [1, 2, 3]), torch.float32)
    assert merge_checkpoints(tmp_path / "samples", parties, weight_by="samples").weights == pytest.approx(
        [3 / 6, 2 / 6, 1 / 6]
    )
    shard = next(parties[1].glob("model-00002-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    shard.write_bytes(bytes(data))
    with pytest.raises(MergeError, match=rf"^{shard}: its SHA-256 does not match .*{MANIFEST}"):
        merge_checkpoints(tmp_path / "tampered", parties)
    no_leftovers(tmp_path / "tampered")


def test_peak_memory_is_a_few_blocks_not_a_tensor_or_the_model(tmp_path):
    """Two checkpoints of 4 x 64 MB fp32 tensors: the merge's peak RSS grows by less than one of those tensors
    (a tensor-by-tensor merge holds two at least, a whole-model one 512 MB)."""
    for i in range(2):
        gen = torch.Generator().manual_seed(i)
        (tmp_path / f"c{i}").mkdir()
        weights = {f"t{k}": torch.randn(4096, 4096, generator=gen) for k in range(4)}
        save_file(weights, tmp_path / f"c{i}" / "model.safetensors")
        del weights
    code = (  # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's (this test process's)
        "import sys, torch\n"
        "from fedfleet.hpc.merge import merge_checkpoints\n"
        "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "torch.ones(1).add_(torch.ones(1))\n"
        "before = hwm()\n"
        "merge_checkpoints(sys.argv[1] + '/out', [sys.argv[1] + '/c0', sys.argv[1] + '/c1'], weights=[1, 1])\n"
        "print((hwm() - before) / 1024)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    grew_mb = float(run.stdout.split()[-1])
    print(f"peak RSS grew {grew_mb:.0f} MB")
    assert grew_mb < 64, f"peak RSS grew {grew_mb:.0f} MB: a 64 MB tensor was held whole"


# -- the server optimisers -------------------------------------------------------------------------------
def mean_of(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in reference(paths, weights).items()}


def strategy_rounds(name: str, params: dict, base: dict, rounds: list[dict]) -> dict[str, torch.Tensor]:
    """The reference: fedfleet's strategy on the whole model as one FlatParams, state kept in memory."""
    strategy = build_strategy(name, **params)
    global_params = FlatParams.from_tensors({k: v.float() for k, v in base.items()})
    state = strategy.init_state(global_params)
    for mean in rounds:
        delta = FlatParams.from_tensors({k: mean[k] for k in base}).add_(global_params, alpha=-1.0)
        strategy.server_step(global_params, Aggregate(params=delta, weight=1.0, count=2), state)
    return global_params.tensors()


def adamw_rounds(params: dict, base: dict, rounds: list[dict]) -> dict[str, torch.Tensor]:
    """The reference: torch.optim.AdamW with clip_grad_norm_ on the pseudo-gradient base - mean."""
    w = {k: torch.nn.Parameter(v.float().clone()) for k, v in base.items()}
    opt = torch.optim.AdamW(
        list(w.values()),
        lr=params["lr"],
        betas=(params["beta1"], 0.999),
        weight_decay=params["weight_decay"],
        eps=1e-8,
        foreach=False,
    )
    for mean in rounds:
        for k, p in w.items():
            p.grad = p.detach() - mean[k]
        torch.nn.utils.clip_grad_norm_(list(w.values()), params["max_norm"], foreach=False)
        opt.step()
    return {k: p.detach() for k, p in w.items()}


@pytest.mark.parametrize(
    "name, params",
    [
        ("fedavgm", {"server_lr": 0.7, "momentum": 0.9}),
        ("fedadam", {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        ("adamw", {"lr": 0.01, "beta1": 0.8, "weight_decay": 0.1, "max_norm": 0.05}),
    ],
)
def test_server_opt_state_survives_a_restart(three, tmp_path, name, params, monkeypatch):
    """Round 1 from the base, round 2 from round 1's output in a new call: the same as one optimiser that ran
    both steps in memory (fp32 outputs, so round 2's base is round 1's model exactly). In row blocks of 100
    elements, as big tensors are merged, state included."""
    monkeypatch.setattr(blocks, "BLOCK", 100)
    base, (a, b, c) = three[0], three
    opt = build_server_opt(name, params)
    r1 = merge_checkpoints(tmp_path / "r1", [b, c], weights=[1, 3], dtype="fp32", base=base, server_opt=opt)
    keys = {"fedavgm": ["momentum"], "fedadam": ["m", "v"], "adamw": ["exp_avg", "exp_avg_sq"]}[name]
    assert r1.step == 1 and all((tmp_path / "r1" / state_file(k)).is_file() for k in keys)
    r2 = merge_checkpoints(tmp_path / "r2", [a, c], weights=[2, 1], dtype="fp32", base=tmp_path / "r1", server_opt=opt)
    assert r2.step == 2
    rounds = [mean_of([b, c], [1, 3]), mean_of([a, c], [2, 1])]
    if name == "adamw":
        assert r1.clip < 1  # the delta's norm was clipped: the whole-model norm was used
        want = adamw_rounds(params, tensors(base), rounds)
    else:
        want = strategy_rounds(name, params, tensors(base), rounds)
    got = tensors(tmp_path / "r2")
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v, rtol=2e-6, atol=2e-7, msg=k)
    manifest = read_manifest(tmp_path / "r2")
    assert manifest.merge["step"] == 2 and manifest.merge["server_opt"]["name"] == name
    assert all(state_file(k) in manifest.sha256 for k in keys)
    fresh = merge_checkpoints(
        tmp_path / "again", [a, c], weights=[2, 1], dtype="fp32", base=tmp_path / "r1", server_opt=opt, reset_state=True
    )
    assert fresh.step == 1


def test_another_optimisers_state_is_refused(three, tmp_path):
    merge_checkpoints(tmp_path / "r1", three[1:], weights=[1, 1], base=three[0], server_opt=build_server_opt("fedadam"))
    with pytest.raises(MergeError, match=r"state is for 'fedadam', not 'fedavgm'.*--reset-state"):
        merge_checkpoints(
            tmp_path / "r2", three[1:], weights=[1, 1], base=tmp_path / "r1", server_opt=build_server_opt("fedavgm")
        )
    no_leftovers(tmp_path / "r2")


# -- refusals: one message, no output ----------------------------------------------------------------------
def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_missing_shard(three, tmp_path):
    broken = copy_of(three[1], tmp_path / "broken")
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        MergeError, match=r"model.safetensors.index.json: shard model-00002-of-00003.safetensors is missing"
    ):
        merge_checkpoints(tmp_path / "out", [three[0], broken], weights=[1, 1])
    no_leftovers(tmp_path / "out")


def test_a_tensor_missing_or_shaped_differently(three, tmp_path):
    full = load_file(three[0] / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    (tmp_path / "missing").mkdir()
    save_file({k: v for k, v in full.items() if k != name}, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(MergeError, match=rf"^tensor '{name}' is missing from {tmp_path / 'missing'} \(it is in "):
        merge_checkpoints(tmp_path / "out", [three[0], tmp_path / "missing"], weights=[1, 1])
    no_leftovers(tmp_path / "out")
    (tmp_path / "shaped").mkdir()
    save_file({**full, name: full[name].t().contiguous()}, tmp_path / "shaped" / "model.safetensors")
    with pytest.raises(
        MergeError, match=rf"^tensor '{name}' is shaped \[32, 64\] in .*shaped/model.safetensors but \[64, 32\]"
    ):
        merge_checkpoints(tmp_path / "out", [three[0], tmp_path / "shaped"], weights=[1, 1])
    no_leftovers(tmp_path / "out")


def test_a_non_finite_value_names_its_file_and_publishes_nothing(three, tmp_path, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK", 100)
    full = load_file(three[0] / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"  # late in the order: shards before it were already written
    bad = full[name].clone()
    bad[3, 4] = math.inf
    (tmp_path / "nan").mkdir()
    save_file({**full, name: bad}, tmp_path / "nan" / "model.safetensors")
    with pytest.raises(
        MergeError, match=rf"^{tmp_path / 'nan' / 'model.safetensors'}: tensor '{name}' holds NaN or infinite"
    ):
        merge_checkpoints(tmp_path / "out", [three[1], tmp_path / "nan"], weights=[1, 1], max_shard_size="10KB")
    no_leftovers(tmp_path / "out")


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0, 0, 0], "the given weights sum to 0: weights must sum to a positive number"),
        ([1, -1, 1], r"weight -1.0 for .*: weights must be finite and >= 0"),
        ([1, 2], "2 weights given for 3 checkpoints"),
        (None, r"no weights: no .*fedfleet-manifest.json; give --weights"),
    ],
)
def test_weights_that_cannot_be_used(three, tmp_path, weights, message):
    with pytest.raises(MergeError, match=message):
        merge_checkpoints(tmp_path / "out", three, weights=weights)
    no_leftovers(tmp_path / "out")


def test_an_existing_output_is_never_touched(three, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints(tmp_path / "out", three, weights=[1, 1, 1])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_fp16_overflow_is_refused(tmp_path):
    for i, v in enumerate([7e4, 9e4]):
        (tmp_path / f"c{i}").mkdir()
        save_file({"w": torch.full((4,), v)}, tmp_path / f"c{i}" / "model.safetensors")
    with pytest.raises(MergeError, match=r"tensor 'w': merged values reach 8e\+04, beyond fp16's range"):
        merge_checkpoints(tmp_path / "out", [tmp_path / "c0", tmp_path / "c1"], weights=[1, 1], dtype="fp16")
    no_leftovers(tmp_path / "out")


# -- the command line ----------------------------------------------------------------------------------------
def test_cli_help_and_a_real_merge_with_a_server_step(three, tmp_path):
    help_run = fedfleet("merge", "--help", cwd=tmp_path)
    assert help_run.returncode == 0
    for text in ("--weights", "--dtype", "--base", "--server-opt", "--max-shard-size", MANIFEST, STATE_PREFIX):
        assert text in help_run.stdout
    run = fedfleet("merge", "out", *map(str, three), "--weights", "1,2,3", "--dtype", "bf16", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "merged 3 checkpoints (weights 0.1667, 0.3333, 0.5) into out: 21 tensors" in run.stdout
    assert "merge: 21/21 tensors" in run.stderr
    assert_within_rounding(tensors(tmp_path / "out"), reference(three, [1, 2, 3]), torch.bfloat16)
    step = fedfleet(
        "merge", "r2", str(three[1]), str(three[2]), "--weights", "1", "1", "--base", "out",
        "--server-opt", "adamw", "--opt", "lr=1e-3", "--opt", "max_norm=0.01", cwd=tmp_path,
    )  # fmt: skip
    assert step.returncode == 0, step.stderr
    assert "adamw step 1 (delta clipped x" in step.stdout and "norm of the delta: 21/21 tensors" in step.stderr
    assert (tmp_path / "r2" / state_file("exp_avg")).is_file() and (
        tmp_path / "r2" / state_file("exp_avg_sq")
    ).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "0", "0", "0"], "the given weights sum to 0"),
        (["--weights", "1", "1", "1", "--server-opt", "fedadam"], "--base and --server-opt go together"),
        (
            ["--weights", "1", "1", "1", "--base", "b", "--server-opt", "fedadamm"],
            "unknown server optimiser 'fedadamm'",
        ),
        (["--weights", "1,1,1", "--base", "b", "--server-opt", "fedadam", "--opt", "lrr=1"], "unknown key 'lrr'"),
    ],
)
def test_cli_refusals_are_one_line(three, tmp_path, args, message):
    run = fedfleet("merge", "out", *map(str, three), *args, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("fedfleet: error: ") and message in run.stderr
    assert not (tmp_path / "out").exists()
