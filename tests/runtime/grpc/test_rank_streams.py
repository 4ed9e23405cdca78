"""A sharded party's ranks, each on its own gRPC stream to a real arbiter on loopback (rank_layout, rank_groups)."""

import dataclasses
import re
import threading

import pytest
import torch

from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.runtime.grpc import Connection, PartyRejected, SyncParty
from fedfleet.runtime.grpc.chunks import MIN_CHUNK_BYTES
from fedfleet.runtime.grpc.rank_layout import LayoutReceiver, RankLayout, iter_layout_chunks, tiles
from fedfleet.runtime.grpc.sharded_party import RankParty
from fedfleet.runtime.grpc.sync_party import _sizes
from fedfleet.runtime.grpc.wire import WireError, decode, encode
from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from tests.grpc_jobs import free_port

SPEC = ParamSpec([("w1", (6, 4), torch.float32), ("b1", (6,), torch.float32), ("w2", (2, 6), torch.float32),
                  ("scale", (3,), torch.float16)])  # fmt: skip
HALVES = [  # rank 0 and rank 1 of the guest: each tensor's rows split between them
    [("w1", 0, 3), ("b1", 0, 3), ("w2", 0, 1), ("scale", 0, 2)],
    [("w1", 3, 3), ("b1", 3, 3), ("w2", 1, 1), ("scale", 2, 1)],
]
NAMES = ["guest-9999", "host-10000"]


def numbered() -> FlatParams:
    flat = FlatParams.zeros(SPEC)
    for buf in flat.buffers.values():
        buf.copy_(torch.arange(buf.numel()).to(buf.dtype))
    return flat


def test_a_layout_maps_each_box_to_its_rows_and_chunks_put_them_back_in_place():
    params = numbered()
    layouts = [RankLayout(SPEC, half) for half in HALVES]
    assert tiles(SPEC, layouts) == ""
    assert layouts[1].compact.names == ["w1[3:6]", "b1[3:6]", "w2[1:2]", "scale[2:3]"]
    target = FlatParams.zeros(SPEC)
    for layout in layouts:
        receiver = LayoutReceiver(target, layout, min_chunk_bytes=0)
        for chunk in iter_layout_chunks(params, layout, chunk_bytes=20):  # chunks straddle the boxes
            receiver.add(decode(encode(chunk)))
        assert receiver.complete
    assert all(torch.equal(target.buffers[d], params.buffers[d]) for d in params.buffers)
    compact = layouts[1].compact
    assert compact["w1[3:6]"].shape == (3, 4) and compact.sizes[torch.float16] == 1


def test_layouts_that_overlap_or_leave_a_gap_and_boxes_out_of_bounds_are_named():
    a, b = RankLayout(SPEC, HALVES[0]), RankLayout(SPEC, [("w1", 2, 4), *HALVES[1][1:]])
    assert "written by two ranks" in tiles(SPEC, [a, b])
    assert "written by no rank" in tiles(SPEC, [a])
    for bad, says in [
        ([("w1", 4, 3)], "outside its 6 rows"),
        ([("nope", 0, 1)], "not one of the session's tensors"),
        ([("w1", 0, 1), ("w1", 1, 1)], "two boxes of w1"),
        ([("w1", 0, 0)], "a box of 0 rows"),
        ([["w1", "0", 1]], "must be [name, first row, rows]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            RankLayout(SPEC, bad)


def test_a_receiver_refuses_a_rank_chunk_out_of_order_or_past_its_boxes():
    layout = RankLayout(SPEC, HALVES[0])
    chunks = [decode(encode(c)) for c in iter_layout_chunks(numbered(), layout, chunk_bytes=MIN_CHUNK_BYTES)]
    receiver = LayoutReceiver(FlatParams.zeros(SPEC), layout)
    receiver.add(chunks[0])
    with pytest.raises(WireError, match="gap or overlap"):
        receiver.add(chunks[0])
    other = [decode(encode(c)) for c in iter_layout_chunks(numbered(), RankLayout(SPEC, [("w1", 0, 6)]), 1 << 20)]
    with pytest.raises(WireError, match="past the buffer"):
        LayoutReceiver(FlatParams.zeros(SPEC), layout).add(other[0])


def connection(address: str, name: str) -> Connection:
    return Connection(address, "s1", name, credentials=None, heartbeat_s=0.5, max_attempts=20, reconnect_max_s=0.5)


def rank_party(address: str, boxes: list, rank: int, rounds: int = 0, kind: type = RankParty) -> RankParty:
    """Rank ``rank`` of 2 of the guest, holding and sending ``boxes`` (a ``kind``: RankParty or a rogue one)."""
    return kind(SPEC, boxes, [b[0] for b in boxes], rank, 2, connection(address, NAMES[0]), rounds)


class Rank:
    """One process's loop: start, then each round add ``step`` to every value it holds and sync."""

    def __init__(self, stream: SyncParty, weight: float, step: float, rounds: int = 2) -> None:
        self.stream, self.weight, self.step, self.rounds = stream, weight, step, rounds
        self.params = FlatParams.zeros(stream.spec)
        self.seen: list[FlatParams] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        try:
            with self.stream:
                self.stream.start(self.params, timeout=60)
                self.seen.append(self.params.clone())
                for _ in range(self.rounds):
                    for buf in self.params.buffers.values():
                        buf.add_(self.step)
                    self.stream.sync(self.params, self.weight, timeout=60)
                    self.seen.append(self.params.clone())
        except BaseException as exc:
            self.error = exc


def serve(address: str, **kw) -> tuple[SyncArbiter, dict]:
    initial = FlatParams.zeros(SPEC)
    settings = {"round_timeout": 60, "wait_timeout": 60, **kw}
    arbiter = SyncArbiter(SyncSessionConfig(session="s1", parties=NAMES, address=address, certs=None,
                                            initial=initial, **settings))  # fmt: skip
    result: dict = {}

    def run() -> None:
        try:
            result["history"] = arbiter.serve()
        except BaseException as exc:
            result["error"] = exc

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    arbiter.server.spec_known.wait(10)
    return arbiter, result


def run_session(address: str, result: dict, streams: list[type]) -> tuple[list[Rank], Rank]:
    """The guest's two ranks (of the ``streams`` classes: weight 10, +2 a round) and the host's one plain stream
    (weight 30, +6 a round), two rounds to the end, each without an error."""
    ranks = [Rank(rank_party(address, HALVES[r], r, rounds=2, kind=streams[r]), 10.0, 2.0) for r in range(2)]
    host = Rank(SyncParty(SPEC, connection(address, NAMES[1]), rounds=2), 30.0, 6.0)
    for r in [*ranks, host]:
        r.thread.start()
    for r in [*ranks, host]:
        r.thread.join(90)
        assert r.error is None, r.error
    result["thread"].join(30)
    return ranks, host


def test_two_ranks_of_one_party_and_a_plain_party_fold_the_weighted_mean_each_rank_moving_only_its_rows():
    """guest: two rank streams (weight 10, +2 per round); host: one plain stream (weight 30, +6 per round). Every
    rank ends on the weighted mean of its own rows (+5 a round), and sent and received only its rows' bytes."""
    address = f"127.0.0.1:{free_port()}"
    arbiter, result = serve(address)
    ranks, host = run_session(address, result, [RankParty, RankParty])
    assert "error" not in result, result.get("error")
    assert len(result["history"]) == 2
    for r in [*ranks, host]:
        floats = [p.buffers[torch.float32] for p in r.seen]
        assert [float(f.mean()) for f in floats] == [0.0, 5.0, 10.0]  # (10 x 2 + 30 x 6) / 40 a round
        assert all(torch.all(f == f[0]) for f in floats)
    for rank in ranks:
        own = rank.stream.spec.nbytes
        # three global params received (start, round 2, final) and two updates sent, each its rows only, in one
        # chunk per dtype with a small safetensors header
        assert 3 * own <= rank.stream.bytes_received <= 3 * (own + 2 * 200)
        assert 2 * own <= rank.stream.bytes_sent <= 2 * (own + 2 * 200)
    assert ranks[0].stream.spec.nbytes + ranks[1].stream.spec.nbytes == SPEC.nbytes
    arbiter.server.stop(0.5)


def test_ranks_whose_boxes_do_not_cover_the_params_once_are_refused_by_name():
    address = f"127.0.0.1:{free_port()}"
    arbiter, _ = serve(address, wait_timeout=5)
    overlapping = [HALVES[0], [("w1", 2, 4), *HALVES[1][1:]]]
    ranks = [Rank(rank_party(address, overlapping[r], r), 10.0, 1.0) for r in range(2)]
    for r in ranks:
        r.thread.start()
    for r in ranks:
        r.thread.join(30)
    errors = [r.error for r in ranks]
    assert any(isinstance(e, PartyRejected) and "written by two ranks" in str(e) for e in errors), errors
    assert NAMES[0] in arbiter.server.refused
    arbiter.server.stop(0.5)


def test_a_party_with_more_ranks_than_the_arbiter_allows_is_told_how_to_run_it():
    address = f"127.0.0.1:{free_port()}"
    arbiter, _ = serve(address, wait_timeout=5, rank_streams=1)
    rank = Rank(RankParty(SPEC, HALVES[0], ["w1"], 0, 2, connection(address, NAMES[0])), 10.0, 1.0)
    rank.thread.start()
    rank.thread.join(30)
    assert isinstance(rank.error, PartyRejected) and "exchange='gathered'" in str(rank.error)
    arbiter.server.stop(0.5)


class GarbledBoxes(RankParty):
    def join_message(self):
        join = super().join_message()
        join.boxes = [[0, "rows", 3, 1]]
        return join


class AnswersTwice(RankParty):
    """Rank 1 sends each update twice, the second time with its rows doubled."""

    def send_params(self, outbox, header, params):
        super().send_params(outbox, header, params.clone())
        super().send_params(outbox, header, params.clone().mul_(2.0))


class SendsTooMuch(RankParty):
    """Rank 1 claims rows it does not hold: its chunks run past its boxes."""

    def send_params(self, outbox, header, params):
        outbox.send(dataclasses.replace(header, spec_digest=self.write_spec.digest, sizes=_sizes(params)))
        whole = FlatParams.zeros(SPEC)
        outbox.send(iter_layout_chunks(whole, RankLayout(SPEC, [("w1", 0, 6)]), 1 << 20))


def test_a_join_with_unreadable_boxes_is_refused_saying_what_a_box_is():
    address = f"127.0.0.1:{free_port()}"
    arbiter, _ = serve(address, wait_timeout=5)
    rank = Rank(rank_party(address, HALVES[0], 0, kind=GarbledBoxes), 10.0, 1.0)
    rank.thread.start()
    rank.thread.join(30)
    assert isinstance(rank.error, PartyRejected) and "[tensor index, first row, rows, sends]" in str(rank.error)
    arbiter.server.stop(0.5)


@pytest.mark.parametrize("rogue", [AnswersTwice, SendsTooMuch])
def test_a_rank_that_answers_twice_or_sends_rows_it_does_not_hold_costs_only_its_party(rogue, caplog):
    """Rank 1 of the guest misbehaves in every round; the host's update still folds (min_parties=1) and the
    guest's ranks end on the session's params. A second answer (its rows doubled) is refused: the first counts,
    and the means are those of both parties; rows past the rank's boxes refuse the guest's update."""
    address = f"127.0.0.1:{free_port()}"
    _, result = serve(address, min_parties=1)
    ranks, host = run_session(address, result, [RankParty, rogue])
    history = result["history"]
    step = 5.0 if rogue is AnswersTwice else 6.0  # both parties' mean, or the host's update alone
    assert [float(p.buffers[torch.float32].mean()) for p in host.seen] == pytest.approx([0.0, step, 2 * step])
    assert not [r.message for r in caplog.records if "reconnecting" in r.message]  # no stream of theirs broke
    if rogue is SendsTooMuch:  # refused within each round (a duplicate may come after its round closed)
        assert all(record.metrics["rejected_chunks"] == 1.0 for record in history), [r.metrics for r in history]
    assert all(float(r.seen[-1].buffers[torch.float32].mean()) == pytest.approx(2 * step) for r in ranks)
