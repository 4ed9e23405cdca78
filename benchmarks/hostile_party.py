"""What one hostile party with a valid certificate costs the arbiter (issue 21), side by side.

1. **Join memory.** A rogue sends a join frame whose layout does not match the session's: 30 MiB (the
   issue's), and 16 MiB (the largest this tree's transport admits; a 30 MiB one gRPC refuses from its length
   prefix). An arbiter from this tree (layout carried as an unread payload) and one from an older revision
   (default f9e3180, layout parsed from the JSON header, 32 MiB messages) each run in a process of their own,
   from their own ``src`` (as in ``startup.py``); the figure is the growth of the arbiter's peak RSS while
   it answers that join (Linux ``clear_refs`` resets the peak first), as a multiple of the frame.
2. **A round beside a stalling party.** Three parties over mTLS on loopback, one of which sends half its
   upload and then only heartbeats, against the same round with three honest parties: the honest round's
   wall time and whether it committed with the two honest updates within its deadline (with one receive
   buffer, the hardest case: the stalled upload holds it until the arbiter takes it back).

    python benchmarks/hostile_party.py            # 3 joins each, 3 rounds per case
    python benchmarks/hostile_party.py --quick    # 1 join each, 2 rounds per case; prints one JSON line last
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' job helpers and rogue parties

from benchmarks.startup import extract  # noqa: E402

JOIN_MIB = (30, 16)  # the issue's frame, and the largest join this tree's transport accepts (16 MiB layout)
PARTIES = ["guest-9999", "host-10000", "host-10001"]

# the arbiter process: a server with a small model's layout; "peak" on stdin resets / reports its peak RSS
ARBITER = r"""
import sys, torch
from fedfleet.core.params import FlatParams
from fedfleet.runtime.grpc.arbiter import ArbiterServer
from fedfleet.runtime.grpc.tls import server_credentials
spec = FlatParams.from_tensors({"w": torch.zeros(256, 256), "b": torch.zeros(256)}).spec
server = ArbiterServer(session="s", parties=sys.argv[2].split(","), spec=spec, address="127.0.0.1:0",
                       credentials=server_credentials(sys.argv[1], "arbiter"))
server.start()
print(server.port, flush=True)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
for command in sys.stdin:
    if command.strip() == "reset":
        open("/proc/self/clear_refs", "w").write("5")
        print(status("VmRSS:"), flush=True)
    elif command.strip() == "peak":
        print(status("VmHWM:"), flush=True)
"""


def join_frame(protocol: int, layout: bytes) -> bytes:
    """A join of the given protocol version, by hand: the layout in the header (3) or as the payload (4)."""
    fields = {"t": "join", "session": "s", "spec_digest": "0" * 16, "protocol": protocol, "name": "host-10001",
              "mode": "tasks", "rounds": 0}  # fmt: skip
    if protocol == 3:
        header = json.dumps(fields).encode()[:-1] + b',"spec":' + layout + b"}"
        return struct.pack("<I", len(header)) + header
    header = json.dumps(fields).encode()
    return struct.pack("<I", len(header)) + header + layout


def big_layout(mib: float) -> bytes:
    """A layout of distinct tensors (an older arbiter parses it whole before it can refuse it), ``mib`` long."""
    rows, size, i = [], 2, 0
    while size < mib * 2**20:
        rows.append(b'["layers.%d.mlp.weight",[4096,4096],"float32"]' % i)
        size += len(rows[-1]) + 1
        i += 1
    return b"[" + b",".join(rows) + b"]"


def send_join(port: int, certs: Path, frame: bytes) -> None:
    import grpc

    from fedfleet.runtime.grpc.service import METHOD, SERVICE, channel_options
    from fedfleet.runtime.grpc.tls import ARBITER_CHANNEL_OPTIONS, channel_credentials

    creds = channel_credentials(certs, "host-10001")
    # a rogue sends as much as it likes: only the arbiter's own limit applies
    options = [o for o in channel_options() if o[0] != "grpc.max_send_message_length"]
    options += [("grpc.max_send_message_length", 64 << 20), *ARBITER_CHANNEL_OPTIONS]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        call = channel.stream_stream(f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None)
        try:
            for _ in call(iter([frame])):  # a reject, then the arbiter closes the stream
                break
        except grpc.RpcError as exc:  # or gRPC refuses the message from its length prefix
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise


def join_memory(src: Path, certs: Path, frame: bytes) -> float:
    """The growth of an arbiter's peak RSS (bytes) while it answers ``frame``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", ARBITER, str(certs), ",".join(PARTIES)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        port = int(proc.stdout.readline())

        def ask(command: str) -> int:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            return int(proc.stdout.readline())

        send_join(port, certs, join_frame(4, b"[]"))  # warm up gRPC's buffers and threads
        base = ask("reset")
        send_join(port, certs, frame)
        return ask("peak") - base
    finally:
        proc.kill()
        proc.wait()


def round_times(tmp: Path, rounds: int, stalling: bool) -> dict:
    from tests.grpc_jobs import ThreadedFederation, make_certs, write_job
    from tests.rogue import HalfUploadParty

    folder = tmp / ("stall" if stalling else "honest")
    folder.mkdir()
    make_certs(folder / "certs", PARTIES)
    deadline = 20.0
    overrides = ["model.hidden=[512]", "network.chunk_mib=0.0625", f"rounds={rounds}", "network.min_parties=2",
                 f"network.round_timeout={deadline:g}", "network.receive_buffers=1", "network.upload_stall_s=2",
                 "eval_every=0"]  # fmt: skip
    classes = {"host-10001": HalfUploadParty} if stalling else None
    fed = ThreadedFederation(write_job(folder), overrides, insecure=False, party_class=classes)
    history = fed.run()
    walls = [r.metrics["wall_s"] for r in history]
    return {
        "round_s": round(max(walls), 2),
        "clients": [r.metrics["clients"] for r in history],
        "within_deadline": all(w < deadline for w in walls),
        "deadline_s": deadline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under 2 minutes)")
    parser.add_argument("--against", default="f9e3180", help="the older revision for the join comparison")
    args = parser.parse_args()
    joins, rounds = (1, 2) if args.quick else (3, 3)
    import logging

    logging.disable(logging.WARNING)  # the stalling party's refusals are expected
    from fedfleet.security import init_ca, issue

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs = tmp / "certs"
        init_ca(certs)
        for name in ["arbiter", *PARTIES]:
            issue(certs, name)
        (tmp / "old").mkdir()
        trees = {"this tree": (ROOT / "src", 4), args.against: (extract(args.against, tmp / "old"), 3)}
        memory: dict[str, dict[str, float]] = {}
        for mib in JOIN_MIB:
            layout = big_layout(mib)
            for label, (src, protocol) in trees.items():
                frame = join_frame(protocol, layout)
                peak = max(join_memory(src, certs, frame) for _ in range(joins))
                memory.setdefault(label, {})[f"{mib:g}"] = peak / len(frame)
                print(f"{label:>10}: peak RSS +{peak / 2**20:.0f} MiB for a {len(frame) / 2**20:.1f} MiB join "
                      f"({peak / len(frame):.2f}x the frame)")  # fmt: skip
        honest = round_times(tmp, rounds, stalling=False)
        stall = round_times(tmp, rounds, stalling=True)
        print(f"three honest parties: longest round {honest['round_s']} s, clients {honest['clients']}")
        print(f"one stalling party:   longest round {stall['round_s']} s, clients {stall['clients']}, within the "
              f"{stall['deadline_s']:g} s deadline: {stall['within_deadline']}")  # fmt: skip
    now, before = memory["this tree"], memory[args.against]
    result = {
        "join30_peak_x_frame": round(now["30"], 2),
        "join30_peak_x_frame_before": round(before["30"], 2),
        "join16_peak_x_frame": round(now["16"], 2),
        "join16_peak_x_frame_before": round(before["16"], 2),
        "stall_round_s": stall["round_s"],
        "honest_round_s": honest["round_s"],
        "stall_round_ratio": round(stall["round_s"] / honest["round_s"], 2),
        "stall_within_deadline": stall["within_deadline"],
        "stall_clients": stall["clients"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
