"""A rank's own slices of published params (runtime/files/slices.py): the values are the full tensors' slices,
only the blocks holding them are read, and every block is checked before a byte of it is used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedfleet.core.params import FlatParams
from fedfleet.core.safetensors_stream import BlockHashes
from fedfleet.runtime.files.exchange import MANIFEST, Refused, publish
from fedfleet.runtime.files.slices import read_slices

EXPECT = {"kind": "global"}
BOXES = {  # rows of a matrix, part of a vector, a scalar, a box of a 3-D tensor in every dim, and no rows at all
    "a": (slice(10, 19), slice(0, 5)),
    "b": (slice(1, 3),),
    "c": (),
    "d": (slice(4, 9), slice(1, 3), slice(0, 2)),
    "e": (slice(6, 6), slice(0, 3)),
}


@pytest.fixture
def flat() -> FlatParams:
    torch.manual_seed(0)
    return FlatParams.from_tensors({"a": torch.randn(37, 5), "b": torch.randn(3), "c": torch.randn(()),
                                    "d": torch.randn(9, 4, 2), "e": torch.randn(6, 3)})  # fmt: skip


@pytest.mark.parametrize("shard_bytes", [None, 200])
def test_slices_are_the_full_tensors_slices_read_from_their_blocks_only(tmp_path: Path, flat, shard_bytes) -> None:
    body = publish(tmp_path, flat, EXPECT, shard_bytes=shard_bytes, block_bytes=64)
    got = read_slices(tmp_path / MANIFEST, EXPECT, flat.spec, BOXES)
    full = flat.tensors()
    for name, region in BOXES.items():
        assert torch.equal(got.tensors[name], full[name][region]), name
    total = sum(entry["bytes"] for entry in body["files"].values())
    assert got.bytes_read < total
    only_a = read_slices(tmp_path / MANIFEST, EXPECT, flat.spec, {"a": BOXES["a"]})
    headers = 0  # every file's header is read, to find the tensors: its blocks
    for file in body["files"]:
        length = 8 + int.from_bytes((tmp_path / file).read_bytes()[:8], "little")
        headers += -(-length // 64) * 64
    assert headers < only_a.bytes_read <= headers + (-(-180 // 64) + 1) * 64  # and the blocks of a's 9 rows


def test_block_sums_are_those_of_the_file_cut_in_blocks(tmp_path: Path, flat) -> None:
    import hashlib

    body = publish(tmp_path, flat, EXPECT, block_bytes=100)
    data = (tmp_path / "params.safetensors").read_bytes()
    want = [hashlib.sha256(data[i : i + 100]).hexdigest() for i in range(0, len(data), 100)]
    assert body["files"]["params.safetensors"]["blocks"] == {"bytes": 100, "sha256": want}
    pieces = BlockHashes(100)
    for i in range(0, len(data), 7):  # fed in pieces of another size
        pieces.update(data[i : i + 7])
    assert pieces.finish() == want


def test_a_changed_byte_is_refused_when_its_block_is_read(tmp_path: Path, flat) -> None:
    publish(tmp_path, flat, EXPECT, block_bytes=64)
    path = tmp_path / "params.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # a value of e, the last tensor
    path.write_bytes(data)
    with pytest.raises(Refused, match=r"block \d+ does not match"):
        read_slices(tmp_path / MANIFEST, EXPECT, flat.spec, {"e": (slice(0, 6), slice(0, 3))})


def test_a_global_without_block_sums_or_with_another_layout_is_refused(tmp_path: Path, flat) -> None:
    publish(tmp_path / "plain", flat, EXPECT)
    with pytest.raises(Refused, match="no block sums"):
        read_slices(tmp_path / "plain" / MANIFEST, EXPECT, flat.spec, BOXES)
    publish(tmp_path / "other", FlatParams.from_tensors({"a": torch.zeros(37, 5)}), EXPECT, block_bytes=64)
    with pytest.raises(Refused, match="layout"):
        read_slices(tmp_path / "other" / MANIFEST, EXPECT, flat.spec, BOXES)
    publish(tmp_path / "short", flat, EXPECT, block_bytes=64)
    manifest = json.loads((tmp_path / "short" / MANIFEST).read_text())
    manifest["files"]["params.safetensors"]["blocks"]["sha256"].pop()
    (tmp_path / "short" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(Refused, match="block sums for"):
        read_slices(tmp_path / "short" / MANIFEST, EXPECT, flat.spec, BOXES)
    assert read_slices(tmp_path / "none-yet" / MANIFEST, EXPECT, flat.spec, BOXES) is None


def test_non_finite_values_in_a_rank_slice_are_refused(tmp_path: Path, flat) -> None:
    flat.tensors()["a"][12, 3] = float("nan")
    publish(tmp_path, flat, EXPECT, block_bytes=64)
    assert read_slices(tmp_path / MANIFEST, EXPECT, flat.spec, {"a": (slice(0, 5), slice(0, 5))}) is not None
    with pytest.raises(Refused, match="NaN"):
        read_slices(tmp_path / MANIFEST, EXPECT, flat.spec, {"a": BOXES["a"]})


def test_a_large_models_block_sums_fit_a_manifest_and_an_oversized_manifest_is_refused_unparsed(tmp_path: Path):
    """The block size grows so that a manifest never lists more than MAX_BLOCKS sums (a 30 GB model's stay a few
    MB); a manifest file over MAX_MANIFEST_BYTES is refused by its size alone."""
    from fedfleet.runtime.files import exchange

    big = 100 << 30  # 100 GB of fp32, on the meta device: only the sizes are read
    assert big > exchange.MAX_BLOCKS * (1 << 20)  # 1 MiB blocks alone would be too many
    fake = [{"w": torch.empty((big // 4,), dtype=torch.float32, device="meta")}]
    chosen = exchange._block_size(fake, 1 << 20)
    assert chosen % (1 << 20) == 0 and big / chosen <= exchange.MAX_BLOCKS
    assert (big / chosen) * 70 < exchange.MAX_MANIFEST_BYTES  # ~70 bytes a sum in the JSON
    path = tmp_path / MANIFEST
    path.write_bytes(b"{" + b" " * exchange.MAX_MANIFEST_BYTES + b"}")
    with pytest.raises(Refused, match="more than a manifest"):
        read_slices(path, EXPECT, FlatParams.from_tensors({"a": torch.zeros(1)}).spec, {})
