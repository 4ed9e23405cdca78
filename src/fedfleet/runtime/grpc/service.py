"""The one gRPC method both sides use: a bidirectional stream of frames (see ``wire.py``).

A party always dials out to the arbiter, so parties behind firewalls or on HPC compute nodes that accept
no inbound connections can take part. Messages stay far below gRPC's size limit: params travel in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from fedfleet.runtime.grpc.wire import Garbled, Message, decode_or_garbled, encode

SERVICE = "fedfleet.Federation"
METHOD = "Connect"
# the largest message is a chunk of at most 16 MiB (network.chunk_mib) or a join's layout of at most 16 MiB
# (arbiter.MAX_LAYOUT_BYTES), plus a header of at most 64 KiB: gRPC refuses a longer one from its length prefix,
# before buffering it (a 30 MiB frame under a 32 MiB limit cost the arbiter 3.5x the frame in copies)
MAX_MESSAGE_BYTES = 17 << 20
FLOW_WINDOW_BYTES = 16 << 20


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # keepalive pings detect a dead peer on an idle stream (e.g. a party training for minutes)
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a fixed flow-control window: with BDP probing, loopback windows grow until a whole model is in
        # flight inside gRPC's buffers, a second copy on each side (measured in benchmarks/streaming.py)
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", FLOW_WINDOW_BYTES),
    ]


def server_options() -> list[tuple[str, Any]]:
    return [
        *channel_options(),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),  # two arbiters on one port must fail loudly, not share it
    ]


Handler = Callable[[Iterator[Message | Garbled], grpc.ServicerContext], Iterator[Message]]


def add_handler(server: grpc.Server, handler: Handler) -> None:
    method = grpc.stream_stream_rpc_method_handler(
        handler, request_deserializer=decode_or_garbled, response_serializer=encode
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: method}),))


def connect_stub(channel: grpc.Channel) -> Callable[[Iterator[Message]], Iterator[Message | Garbled]]:
    return channel.stream_stream(
        f"/{SERVICE}/{METHOD}", request_serializer=encode, response_deserializer=decode_or_garbled
    )
