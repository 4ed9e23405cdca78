"""The bodies of secure aggregation's stage messages: round trips, and every oversized or malformed one refused."""

import numpy as np
import pytest

from fedfleet.runtime.grpc import secure_wire as sw
from fedfleet.runtime.grpc.chunks import iter_chunks
from fedfleet.runtime.grpc.wire import SecAggAdvert, SecAggRoster, SecAggSetup, WireError, decode, encode
from fedfleet.secagg import SecAggConfig
from fedfleet.secagg.messages import EncryptedShare, Roster, UnmaskReply, UnmaskRequest

N, DEGREE = 5, 4


def roster():
    keys = {j: (bytes([j]) * 32, bytes([j + 100]) * 32) for j in (2, 3, 4, 5)}
    cipher, mask = {j: c for j, (c, _) in keys.items()}, {j: m for j, (_, m) in keys.items()}
    return Roster("s", 1, 1, 9, (1, 2, 3, 4, 5), cipher, mask)


def test_stage_messages_and_their_bodies_round_trip():
    setup = SecAggSetup(task_id="t", round=1, session="s", party=2, n=5, config={"bits": 16}, graph_seed=9)
    assert decode(encode(setup)) == setup
    signed = {2: sw.Signed(b"sig", b"cert"), 3: sw.Signed()}
    back, back_signed = sw.decode_roster(sw.encode_roster(roster(), signed), "s", 1, 1, 9, N, DEGREE)
    assert back == roster() and back_signed == {2: signed[2], 3: signed[3], 4: sw.Signed(), 5: sw.Signed()}
    message = decode(encode(SecAggRoster(task_id="t", round=1, payload=sw.encode_roster(roster(), {}))))
    assert sw.decode_roster(message.payload, "s", 1, 1, 9, N, DEGREE)[0] == roster()

    shares = [EncryptedShare("s", 1, 1, j, bytes([j]) * sw.SEALED_BYTES) for j in (2, 3)]
    assert sw.decode_shares(sw.encode_shares(shares), "s", 1, 1, N, DEGREE) == shares
    inbox = [EncryptedShare("s", 1, j, 1, bytes([j]) * sw.SEALED_BYTES) for j in (4, 5)]
    assert sw.decode_inbox(sw.encode_shares(inbox, by_sender=True), "s", 1, 1, N, DEGREE) == inbox

    request = UnmaskRequest("s", 1, 1, frozenset({1, 2, 3}), frozenset({4}))
    assert sw.decode_request(sw.encode_request(request), "s", 1, 1, N, DEGREE) == request
    reply = UnmaskReply("s", 1, 1, {2: 2**520 + 5, 3: 7}, {4: 11})
    assert sw.decode_reply(sw.encode_reply(reply), "s", 1, 1, N, DEGREE) == reply
    advert = SecAggAdvert(cipher_pk="ab" * 32, payload=sw.encode_signed(sw.Signed(b"x" * 70, b"c" * 600)))
    assert sw.decode_signed(decode(encode(advert)).payload) == sw.Signed(b"x" * 70, b"c" * 600)


def test_a_masked_input_travels_as_the_same_bytes_in_a_signed_integer_layout():
    for ring_bits, dtype in ((32, np.uint32), (64, np.uint64)):
        data = np.array([0, 1, np.iinfo(dtype).max, 2**31], dtype=dtype)
        params, _ = sw.lend(data)
        assert params.spec == sw.masked_spec(3, ring_bits)
        assert np.array_equal(sw.ring_vector(params), data)
        assert np.shares_memory(sw.ring_vector(params), data)  # views both ways: the masked model is never copied
    assert SecAggConfig().validate(4).ring_bits == 32


def test_a_lent_masked_input_is_free_again_only_when_no_chunk_of_its_upload_is_left():
    data = np.arange(10_001, dtype=np.uint32)
    params, read = sw.lend(data)
    chunks = iter_chunks(params, chunk_bytes=4096)
    first = next(chunks)
    del params
    assert read() is not None  # the upload is under way
    rest = list(chunks)  # every chunk made, some still held (queued for the network)
    del chunks, first
    assert read() is not None
    del rest
    assert read() is None


@pytest.mark.parametrize(
    "decoder, payload, message",
    [
        # longer than the round allows: refused before a byte is read
        (sw.decode_shares, b"\x00" * ((DEGREE + 1) * 164), "this round allows at most 656"),
        (sw.decode_reply, b"\x00" * ((DEGREE + 1) * 71), "this round allows at most 284"),
        (sw.decode_request, b"\x00" * 100, "this round allows at most 44"),
        (sw.decode_shares, b"\x00" * 165, "not whole records"),
        (sw.decode_shares, b"\x00\x00\x00\x09" + b"\x00" * 160, r"party id 9 outside the round's 1..5"),
        (sw.decode_shares, b"\x00\x00\x00\x00" + b"\x00" * 160, r"party id 0 outside"),
        (sw.decode_reply, b"\x02\x00\x00\x00\x02" + b"\x00" * 66, "unknown kind 2"),
        (sw.decode_reply, (b"\x00\x00\x00\x00\x02" + b"\x00" * 66) * 2, "two shares for 2"),
        (sw.decode_request, b"\x00\x00\x00\x09", "counts 9 entries; this round allows at most 5"),
        (sw.decode_request, b"\x00\x00\x00\x01\x00\x00\x00\x02", "ends 4 bytes early"),
        (sw.decode_request, b"\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02", "lists a party twice"),
        (sw.decode_request, b"\x00" * 8 + b"\x01", "1 bytes after its end"),
    ],
)
def test_oversized_and_malformed_bodies_are_wire_errors(decoder, payload, message):
    with pytest.raises(WireError, match=message):
        decoder(payload, "s", 1, 1, N, DEGREE)


def test_a_roster_or_advert_beyond_its_bounds_is_refused():
    body = sw.encode_roster(roster(), {})
    with pytest.raises(WireError, match="this round allows at most"):
        sw.decode_roster(body + b"\x00" * 20_000, "s", 1, 1, 9, N, DEGREE)
    with pytest.raises(WireError, match="counts 4 entries; this round allows at most 2"):
        sw.decode_roster(body, "s", 1, 1, 9, N, 2)
    with pytest.raises(WireError, match="at most 80"):
        sw.decode_signed(b"\x01\x00" + b"\x00" * 300)
    with pytest.raises(WireError, match=r"ends .* early"):
        sw.decode_signed(b"\x00\x05abc")
    twice = body[: 4 + 5 * 4] + b"\x00\x00\x00\x02" + body[4 + 5 * 4 + 4 :][:72] * 2
    with pytest.raises(WireError, match="neighbour 2 twice"):
        sw.decode_roster(twice, "s", 1, 1, 9, N, DEGREE)
