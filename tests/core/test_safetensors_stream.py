"""fedfleet.core.safetensors_stream: files safetensors reads and files it writes, tensors as views of the bytes,
and headers that lie about their tensors refused with the reason."""

import json

import pytest
import torch
from safetensors.torch import load, save

from fedfleet.core.params import FlatParams
from fedfleet.core.safetensors_stream import tensors_in, write_file


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g),
        "steps": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
    }


def test_written_files_are_safetensors_and_safetensors_files_are_read(tmp_path):
    tensors = sample()
    flat = FlatParams.from_tensors({k: v for k, v in tensors.items() if v.is_floating_point()})
    digest, size = write_file(tmp_path / "a.safetensors", {**flat.tensors(), "steps": tensors["steps"]})
    data = (tmp_path / "a.safetensors").read_bytes()
    import hashlib

    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    theirs = load(data)
    assert all(torch.equal(theirs[k], v) for k, v in {**flat.tensors(), "steps": tensors["steps"]}.items())
    mine = tensors_in(bytearray(save(tensors)))
    assert set(mine) == set(tensors) and all(torch.equal(mine[k], v) for k, v in tensors.items())


def test_the_tensors_are_views_of_the_bytes():
    data = bytearray(save({"x": torch.zeros(4)}))
    x = tensors_in(data)["x"]
    data[-4:] = torch.tensor([2.5]).numpy().tobytes()
    assert x[-1].item() == 2.5


def forged(header: dict, data: bytes = b"\0" * 16, length: int | None = None) -> bytearray:
    text = json.dumps(header).encode()
    return bytearray((len(text) if length is None else length).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (bytearray(b"\1\0"), "shorter than a safetensors header"),
        (forged({}, length=1 << 40), "does not fit"),
        (bytearray((4).to_bytes(8, "little") + b"nope"), "not JSON"),
        (forged([1, 2]), "not a JSON object"),
        (forged({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}), "12 bytes for shape"),
        (forged({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}), "start at 8"),
        (forged({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "cover 8 of the data's 16"),
        (
            forged(
                {
                    "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                }
            ),
            "start at 0",
        ),
        (forged({"x": {"dtype": "O", "shape": [4], "data_offsets": [0, 16]}}), "dtype 'O'"),
        (forged({"x": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}), "bad shape"),
        (forged({"x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}), "bad data_offsets"),
        (forged({"x": "F32"}), "bad data_offsets"),
    ],
)
def test_a_header_that_lies_is_refused_with_the_reason(blob, why):
    with pytest.raises(ValueError, match=why):
        tensors_in(blob)
