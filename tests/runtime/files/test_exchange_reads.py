"""How the files runtime reads a published model: fedfleet's own shards straight into the global layout (no
whole-file buffer), a shard another tool wrote (tensors in another order) the general way, same values."""

import json

import torch
from safetensors.torch import save_file

from fedfleet.core.params import FlatParams
from fedfleet.runtime.files import exchange
from fedfleet.runtime.files.exchange import file_sum, publish, verify

MANIFEST = {"session": "s", "round": 1, "kind": "global"}


def model() -> FlatParams:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed": (50, 8), "layer.0": (8, 8), "layer.1": (8, 8), "norm": (8,), "head": (50, 8)}
    return FlatParams.from_tensors({n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()})


def test_fedfleets_shards_are_read_into_the_layout_without_a_whole_file_buffer(tmp_path, monkeypatch):
    params = model()
    publish(tmp_path, params, MANIFEST, shard_bytes=900)  # several shards
    assert len(list(tmp_path.glob("params-*.safetensors"))) > 2
    whole_reads = []
    real = exchange.read_bytes
    monkeypatch.setattr(exchange, "read_bytes", lambda path: whole_reads.append(path) or real(path))
    got = verify(tmp_path / "manifest.json", MANIFEST, params.spec)
    assert got.params.allclose(params, rtol=0, atol=0)
    assert not whole_reads  # every shard went straight into the global buffer


def test_a_shard_with_its_tensors_in_another_order_is_read_the_general_way(tmp_path):
    params = model()
    publish(tmp_path, params, MANIFEST)
    tensors = params.tensors()
    save_file({n: tensors[n].clone() for n in reversed(list(tensors))}, str(tmp_path / "params.safetensors"))
    body = json.loads((tmp_path / "manifest.json").read_text())
    digest, size = file_sum(tmp_path / "params.safetensors")
    body["files"]["params.safetensors"] = {"sha256": digest, "bytes": size}
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    got = verify(tmp_path / "manifest.json", MANIFEST, params.spec)
    assert got.params.allclose(params, rtol=0, atol=0)
