"""A checkpoint that is truncated, damaged, edited or impossible is a clear error (exit 2), never a traceback
or a silently different resumed run."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedfleet.core.checkpoint import CheckpointDamagedError, load_checkpoint, save_checkpoint
from fedfleet.core.params import FlatParams


def snap(rounds=3):
    params = FlatParams.from_tensors({"w": torch.arange(4.0)})
    history = [{"round": r, "metrics": {"loss": 1.0}} for r in range(rounds)]
    return {"global": params, "state": {}, "round": rounds, "sim_time": 1.5, "seed": 0, "history": history}


def write(tmp_path, s=None):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, s or snap())
    return path


def like():
    return FlatParams.from_tensors({"w": torch.zeros(4)})


def test_a_good_checkpoint_round_trips(tmp_path):
    back = load_checkpoint(write(tmp_path), like(), {})
    assert back["round"] == 3 and back["global"].tensors()["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble"])
def test_unreadable_checkpoints_name_the_file_and_the_fix(tmp_path, damage):
    path = write(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garble": b"\x07" * 200}[damage])
    with pytest.raises(CheckpointDamagedError, match=r"cannot be read .* --overwrite"):
        load_checkpoint(path, like(), {})


def rewrite(path, tensors=None, **meta_changes):
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(metadata["meta"])
    meta.update(meta_changes)
    metadata["meta"] = json.dumps(meta)
    save_file(tensors or stored, str(path), metadata=metadata)


def test_a_changed_value_fails_the_checksum(tmp_path):
    path = write(tmp_path)
    rewrite(path, tensors={"global/w": torch.tensor([0.0, 1.0, 2.0, 3.0001])})
    with pytest.raises(CheckpointDamagedError, match="does not match its own SHA-256"):
        load_checkpoint(path, like(), {})


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"round": -5}, "round -5 is not a count"), ({"round": 7}, "do not end at round 7"),
     ({"sim_time": float("nan")}, "virtual clock")],
)  # fmt: skip
def test_impossible_bookkeeping_is_refused(tmp_path, changes, message):
    path = write(tmp_path)
    rewrite(path, **changes)  # the metadata is outside the checksum: checked on its own
    with pytest.raises(CheckpointDamagedError, match=message):
        load_checkpoint(path, like(), {})
