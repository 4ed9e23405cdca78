"""Every byte a real arbiter received in a secure round over gRPC, and what it tells about one party's update: nothing
(the masked inputs are uncorrelated with every party's true quantised update, and no stretch of an update's bytes
appears in any frame). The same recording of a plain round reads each update back exactly: the test can fail."""

from collections import defaultdict

import numpy as np
import pytest

from fedfleet.core.params import FlatParams
from fedfleet.runtime.grpc import secure_wire as sw
from fedfleet.runtime.grpc import service
from fedfleet.runtime.grpc.arbiter import ArbiterServer
from fedfleet.runtime.grpc.chunks import ParamsReceiver
from fedfleet.runtime.grpc.party import Party
from fedfleet.runtime.grpc.secure_party import SecureStages
from fedfleet.runtime.grpc.wire import Chunk, Result
from fedfleet.secagg.in_process import flatten
from fedfleet.secagg.quantize import quantize
from tests.runtime.grpc.secure_helpers import secure_federation


class Recording:
    """Every frame the arbiter's gRPC server decoded, and the same messages by the stream (party) they came on."""

    def __init__(self, monkeypatch) -> None:
        self.frames: list[bytes] = []
        self.by_party: dict[str, list] = defaultdict(list)
        decode, on_message = service.decode_or_garbled, ArbiterServer._on_message

        def recording_decode(frame):
            self.frames.append(bytes(frame))
            return decode(frame)

        def recording_on_message(server, link, msg, state):
            self.by_party[link.name].append(msg)
            return on_message(server, link, msg, state)

        monkeypatch.setattr(service, "decode_or_garbled", recording_decode)
        monkeypatch.setattr(ArbiterServer, "_on_message", recording_on_message)

    def uploads(self, spec) -> dict[str, tuple[Result, FlatParams]]:
        """Each party's uploaded params of ``spec``, rebuilt from its chunks, with its result header."""
        out = {}
        for name, messages in self.by_party.items():
            for i, msg in enumerate(messages):
                if isinstance(msg, Result) and msg.has_params:
                    params = FlatParams.zeros(spec)
                    receiver = ParamsReceiver(params)
                    for chunk in (m for m in messages[i + 1 :] if isinstance(m, Chunk)):
                        if receiver.complete:
                            break
                        receiver.add(chunk)
                    out[name] = (msg, params)
        return out

    def holds(self, vector: np.ndarray) -> bool:
        """Whether any stretch of 8 consecutive float32 values of ``vector`` appears in a frame."""
        everything = b"".join(self.frames)
        raw = vector.astype(np.float32)
        return any(raw[s : s + 8].tobytes() in everything for s in range(0, raw.size - 8, raw.size // 20))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


@pytest.fixture
def true_updates(monkeypatch):
    """Each party's update as it was before it left the party (masked or not)."""
    updates: dict[str, np.ndarray] = {}
    mask, send = SecureStages.mask, Party.send_params

    def recording_mask(stages, task, update):
        updates[stages.name] = flatten(update.params).astype(np.float64)
        return mask(stages, task, update)

    def recording_send(party, outbox, header, params):
        if party.secure is None and header.task == "fit":
            updates[party.conn.name] = flatten(params).astype(np.float64)
        return send(party, outbox, header, params)

    monkeypatch.setattr(SecureStages, "mask", recording_mask)
    monkeypatch.setattr(Party, "send_params", recording_send)
    return updates


def test_no_partys_update_can_be_recovered_from_every_byte_the_arbiter_received(tmp_path, monkeypatch, true_updates):
    recording = Recording(monkeypatch)
    fed = secure_federation(tmp_path, ["rounds=1"])
    fed.run()
    config, numel = fed.job.secure_aggregation, fed.arbiter.server.spec.numel
    plan = config.validate(4)
    uploads = recording.uploads(sw.masked_spec(numel, plan.ring_bits))
    assert sorted(uploads) == sorted(true_updates) and len(uploads) == 4
    for name, (header, params) in uploads.items():
        masked = sw.ring_vector(params)[:-1]
        for other, update in true_updates.items():
            # the other party's update exactly as it was quantised under the masks (its rounding generator)
            weight = min(float(header.weight), config.max_weight) / config.max_weight if other == name else 1.0
            party = header.secagg_party if other == name else 1
            rng = np.random.default_rng((fed.job.seed, 0, party))
            quantised = quantize(update, config.clip, config.bits, plan.dtype, rng, scale=weight)
            assert corr(quantised, update) > 0.99  # the quantised update is the update
            assert abs(corr(masked, quantised)) < 0.1, (name, other)
        assert not recording.holds(true_updates[name])


def test_the_same_recording_of_a_plain_round_reads_every_update_back(tmp_path, monkeypatch, true_updates):
    recording = Recording(monkeypatch)
    fed = secure_federation(tmp_path, ["rounds=1"], extra="")
    fed.run()
    uploads = recording.uploads(fed.arbiter.server.spec)
    assert len(uploads) == 4
    for name, (_, params) in uploads.items():
        assert corr(flatten(params), true_updates[name]) > 0.9999
        assert recording.holds(true_updates[name])
