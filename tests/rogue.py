"""A rogue party for the hostile-party tests: it holds a valid certificate of the job's CA and speaks the wire
protocol by hand (raw frames on its own stream), or runs the normal party with one step changed."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path

import grpc

from fedfleet.core.fit_config import FitConfig
from fedfleet.runtime.grpc import Connection, Party
from fedfleet.runtime.grpc.chunks import iter_chunks
from fedfleet.runtime.grpc.service import METHOD, SERVICE, channel_options
from fedfleet.runtime.grpc.tls import ARBITER_CHANNEL_OPTIONS, channel_credentials
from fedfleet.runtime.grpc.wire import Message, decode_or_garbled, encode

_END = object()


class RawStream:
    """One stream to the arbiter, as ``name`` (its certificate from ``certs``): frames go out as given."""

    def __init__(self, address: str, certs: Path, name: str) -> None:
        self.conn = Connection(address, "", name, channel_credentials(certs, name))
        self.channel = self._unlimited_channel()
        self._out: queue.Queue = queue.Queue()
        self.received: queue.Queue = queue.Queue()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        call = self.channel.stream_stream(
            f"/{SERVICE}/{METHOD}",
            request_serializer=lambda item: item if isinstance(item, bytes) else encode(item),
            response_deserializer=decode_or_garbled,
        )
        self._responses = call(self._frames())
        threading.Thread(target=self._read, daemon=True).start()

    def _unlimited_channel(self) -> grpc.Channel:
        """The party's channel, except that it sends messages of any size: only the arbiter's limit applies."""
        options = [o for o in channel_options() if o[0] != "grpc.max_send_message_length"]
        options += [("grpc.max_send_message_length", 256 << 20), *ARBITER_CHANNEL_OPTIONS]
        return grpc.secure_channel(self.conn.address, self.conn.credentials, options=options)

    def send(self, item: Message | bytes) -> None:
        self._out.put(item)

    def next_message(self, timeout: float = 10.0):
        return self.received.get(timeout=timeout)

    def close(self) -> None:
        self._out.put(_END)
        self.channel.close()

    def _frames(self):
        while (item := self._out.get()) is not _END:
            yield item

    def _read(self) -> None:
        try:
            for msg in self._responses:
                self.received.put(msg)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()


def wait_for(condition, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


class CheatingParty(Party):
    """The normal party, except for how it answers a fit task: ``answer(task, update, outbox)``."""

    def _run(self, task, outbox):
        if task.task != "fit":
            return super()._run(task, outbox)
        update = self.trainer.fit(self.inbox, FitConfig(**task.config), self.train_data)
        self.answer(task, update, outbox)

    def answer(self, task, update, outbox):
        outbox.send(self.result_header(task, update.weight, update.metrics, update.params))
        outbox.send(iter_chunks(update.params, self.conn.chunk_bytes))


class HalfUploadParty(CheatingParty):
    """Sends its result header and the first half of its chunks, then only heartbeats (its heartbeat thread)."""

    def answer(self, task, update, outbox):
        chunks = list(iter_chunks(update.params, self.conn.chunk_bytes))
        assert len(chunks) >= 2, "the test's chunk size must split the model"
        outbox.send(self.result_header(task, update.weight, update.metrics, update.params))
        outbox.send(chunks[: len(chunks) // 2])


class TrickleParty(CheatingParty):
    """An honest but slow link: its chunks leave one every ``gap_s`` seconds."""

    gap_s = 1.0

    def answer(self, task, update, outbox):
        def slowly():
            for chunk in iter_chunks(update.params, self.conn.chunk_bytes):
                time.sleep(self.gap_s)
                yield chunk

        outbox.send(self.result_header(task, update.weight, update.metrics, update.params))
        outbox.send(slowly())


class MisaddressedMaskedInput(Party):
    """The normal party of a secure session, except that before its masked input it sends the same masked input
    addressed wrongly: for the round before, for another session, and as another party of the round."""

    def send_params(self, outbox, header, params):
        if header.secagg_party:  # a masked input
            wrong = [{"round": header.round - 1}, {"session": "another-session"},
                     {"secagg_party": header.secagg_party % 4 + 1}]  # fmt: skip
            for change in wrong:
                outbox.send(dataclasses.replace(header, **change))
                outbox.send(iter_chunks(params, self.conn.chunk_bytes))
        super().send_params(outbox, header, params)
