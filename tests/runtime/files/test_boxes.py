"""Updates published as boxes (issue 17's sharded exchange, the arbiter's side): pieces of tensors by name and
offset from several files, as the ranks of an FSDP party would write them, assembled exactly, or refused naming
the file when the boxes do not tile the model."""

from __future__ import annotations

import pytest
import torch

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.runtime.files import FileRuntime, Refused
from fedfleet.runtime.files.boxes import publish_boxes
from fedfleet.runtime.files.exchange import MANIFEST, publish, verify
from fedfleet.select import build_selector
from fedfleet.strategy import build_strategy

EXPECT = {"session": "s", "party": "p", "round": 1, "kind": "update"}


def model() -> FlatParams:
    g = torch.Generator().manual_seed(0)
    return FlatParams.from_tensors({"w": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)})


def rank_boxes(params: FlatParams, ranks: int) -> dict[str, list]:
    """Each tensor cut along dim 0 as torch.chunk does (FSDP's split), one file per rank."""
    files: dict[str, list] = {f"rank-{r:05d}.safetensors": [] for r in range(ranks)}
    for name, t in params.tensors().items():
        start = 0
        for r, piece in enumerate(torch.chunk(t, ranks)):
            offsets = [start] + [0] * (t.dim() - 1)
            files[f"rank-{r:05d}.safetensors"].append((name, offsets, piece))
            start += piece.shape[0]
    return files


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_boxes_from_any_number_of_ranks_assemble_the_update_exactly(tmp_path, ranks):
    params = model()
    publish_boxes(tmp_path, rank_boxes(params, ranks), params.spec, dict(EXPECT))
    found = verify(tmp_path / MANIFEST, EXPECT, params.spec)
    assert found is not None and found.params.allclose(params, rtol=0, atol=0)


def boxes_with(tmp_path, change):
    params = model()
    files = rank_boxes(params, 2)
    change(files)
    publish_boxes(tmp_path, files, params.spec, dict(EXPECT))
    return params


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda f: f["rank-00001.safetensors"].pop(), r"values of b are in no box"),
        (lambda f: f["rank-00001.safetensors"].append(f["rank-00000.safetensors"][0]), r"overlaps another box of w"),
        (lambda f: f["rank-00000.safetensors"].__setitem__(0, ("w", [4, 0], torch.zeros(3, 3))), r"not inside w"),
        (lambda f: f["rank-00000.safetensors"].__setitem__(0, ("v", [0, 0], torch.zeros(3, 3))), r"'v'"),
        (lambda f: f["rank-00000.safetensors"].__setitem__(0, ("w", [0, 0], torch.zeros(3, 3).double())),
         r"float64, w is torch.float32"),
    ],
)  # fmt: skip
def test_boxes_that_do_not_tile_the_model_are_refused_naming_the_file(tmp_path, change, why):
    params = boxes_with(tmp_path, change)
    with pytest.raises(Refused, match=why):
        verify(tmp_path / MANIFEST, EXPECT, params.spec)


def test_a_damaged_box_file_is_refused_by_its_checksum(tmp_path):
    params = model()
    publish_boxes(tmp_path, rank_boxes(params, 2), params.spec, dict(EXPECT))
    path = tmp_path / "rank-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(Refused, match=r"rank-00001.safetensors: its SHA-256 is not the manifest's"):
        verify(tmp_path / MANIFEST, EXPECT, params.spec)


def test_the_file_runtime_folds_a_party_of_boxes_with_a_party_of_one_file(tmp_path):
    """Two parties, one publishing whole params, one in boxes of 3 ranks: the mean is the same as both whole."""
    start = model()
    runtime = FileRuntime(tmp_path, session="s", parties=["one", "boxed"], min_parties=2, round_timeout=10,
                          poll_s=0.02)  # fmt: skip
    loop = RoundLoop(build_strategy("fedavg"), runtime, build_selector("uniform"), start.clone(), FitConfig(),
                     LoopConfig(rounds=1, cohort=2, seed=0, eval_every=0))  # fmt: skip
    deltas = {"one": start.clone().mul_(0.5), "boxed": start.clone().mul_(-0.25)}
    weights = {"one": 1.0, "boxed": 3.0}
    original = runtime.publish_global

    def publish_and_answer(rnd, params, tasks):  # the parties answer as soon as the global is out
        digest = original(rnd, params, tasks)
        for name, delta in deltas.items():
            body = {"session": "s", "party": name, "round": rnd, "kind": "update", "weight": weights[name],
                    "is_delta": True, "metrics": {}, "stats": {}, "global_manifest_sha256": digest}  # fmt: skip
            folder = runtime.exchange.update_dir(rnd, name)
            if name == "boxed":
                publish_boxes(folder, rank_boxes(delta, 3), delta.spec, body)
            else:
                publish(folder, delta, body)
        return digest

    runtime.publish_global = publish_and_answer
    loop.run()
    expected = start.clone().add_(deltas["one"], alpha=0.25).add_(deltas["boxed"], alpha=0.75)
    assert loop.global_params.allclose(expected, rtol=0, atol=1e-6)
