"""Frames and params chunks: round trips, and every malformed or misplaced chunk refused with a reason."""

import pytest
import torch
from safetensors.torch import load

from fedfleet.core.params import FlatParams
from fedfleet.runtime.grpc.chunks import ParamsReceiver, iter_chunks
from fedfleet.runtime.grpc.wire import Chunk, Join, Result, WireError, decode, encode


def mixed_params():
    return FlatParams.from_tensors(
        {
            "w": torch.arange(1000, dtype=torch.float32).view(10, 100),
            "h": torch.linspace(-1, 1, 301).to(torch.bfloat16),
            "steps": torch.tensor([7, 8, 9], dtype=torch.int64),
        }
    )


def test_messages_round_trip_with_their_types():
    msg = Result(task_id="t1", round=3, weight=12.0, metrics={"loss": 0.5}, has_params=True, sizes={"float32": 4})
    back = decode(encode(msg))
    assert isinstance(back, Result) and back == msg
    assert isinstance(decode(encode(Join(session="s", spec_digest="d"))), Join)


@pytest.mark.parametrize("frame", [b"", b"\x05\x00\x00\x00{", b"\x02\x00\x00\x00{}", b'\x0b\x00\x00\x00{"t":"zzz"}'])
def test_garbage_frames_are_wire_errors(frame):
    with pytest.raises(WireError):
        decode(frame)


def test_params_stream_in_small_chunks_and_arrive_identical():
    src = mixed_params()
    chunks = [decode(encode(c)) for c in iter_chunks(src, chunk_bytes=256)]
    assert len(chunks) > 10  # the float32 buffer alone is 4000 bytes
    dst = src.zeros_like()
    receiver = ParamsReceiver(dst, min_chunk_bytes=0)
    for c in chunks:
        assert not receiver.complete
        receiver.add(c)
    assert receiver.complete
    for d in src.buffers:
        assert torch.equal(src.buffers[d], dst.buffers[d])


def test_each_chunk_is_a_safetensors_file():
    src = mixed_params()
    chunk = next(iter_chunks(src, chunk_bytes=64))
    tensors = load(bytes(decode(encode(chunk)).payload))
    assert torch.equal(tensors["data"], src.buffers[torch.float32][:16])


def chunk_list(params, size=256):
    return [decode(encode(c)) for c in iter_chunks(params, chunk_bytes=size)]


def test_gap_overlap_and_overflow_are_refused():
    src = mixed_params()
    chunks = chunk_list(src)
    receiver = ParamsReceiver(src.zeros_like(), min_chunk_bytes=0)
    receiver.add(chunks[0])
    with pytest.raises(WireError, match="gap or overlap"):
        receiver.add(chunks[2])  # skips chunk 1
    with pytest.raises(WireError, match="gap or overlap"):
        receiver.add(chunks[0])  # the same bytes twice
    small = FlatParams.from_tensors({"w": torch.zeros(10)})
    with pytest.raises(WireError, match="past the buffer"):
        ParamsReceiver(small, min_chunk_bytes=0).add(chunks[0])  # 64 floats into a buffer of 10


def test_a_buffer_of_another_dtype_is_refused():
    halves = FlatParams.from_tensors({"w": torch.zeros(4, dtype=torch.float16)})
    chunk = chunk_list(FlatParams.from_tensors({"w": torch.zeros(4)}))[0]
    with pytest.raises(WireError, match="float32 buffer"):
        ParamsReceiver(halves).add(chunk)


def test_a_corrupt_chunk_header_is_refused():
    with pytest.raises(WireError, match="malformed chunk"):
        ParamsReceiver(mixed_params()).add(Chunk(payload=b"\x10" + b"\x00" * 7 + b"{not json"))


def test_small_chunks_before_a_buffers_end_are_refused():
    """A sender cutting its params into tiny chunks would make the receiver loop once per element."""
    src = mixed_params()
    chunks = chunk_list(src)
    with pytest.raises(WireError, match="before the buffer's end"):
        ParamsReceiver(src.zeros_like()).add(chunks[0])
    whole = FlatParams.from_tensors({"w": torch.zeros(10)})
    receiver = ParamsReceiver(whole.zeros_like())
    receiver.add(chunk_list(whole)[0])  # a buffer's last chunk may be small
    assert receiver.complete


def test_headers_over_the_limit_and_payloads_on_headers_only_messages_are_refused():
    from fedfleet.runtime.grpc.wire import MAX_HEADER_BYTES, Garbled, Heartbeat, decode_or_garbled

    long_header = Result(metrics={"m" * (MAX_HEADER_BYTES + 1): 1.0})
    with pytest.raises(WireError, match="header of"):
        decode(encode(long_header))
    with pytest.raises(WireError, match="carries no payload"):
        decode(encode(Heartbeat(payload=b"x" * 100)))
    assert isinstance(decode_or_garbled(b"\x01"), Garbled)
    assert isinstance(decode(encode(Join(payload=b"[]"))), Join)
