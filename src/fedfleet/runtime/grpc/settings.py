"""One settings type, with one set of defaults, for every deployed session.

A job file's ``network:`` section (``config.schema.NetworkConfig``), a party-paced arbiter
(``sync.arbiter.SyncSessionConfig``, behind ``FedAvgServer``) and a party's ``create_context`` all take
their defaults from :class:`SessionSettings`, so the same session means the same timeouts and limits
whether it is started from YAML or from Python. The one default that depends on how rounds are paced is
the round timeout: a server-driven round is a few local epochs (10 minutes), a party-paced round is
whatever the party's own trainer does between syncs, e.g. an epoch of LLM fine-tuning (a day).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from fedfleet.runtime.grpc.wire import JoinMode

# seconds a round waits for the selected parties' updates, when the settings do not say
ROUND_TIMEOUT: dict[JoinMode, float] = {JoinMode.TASKS: 600.0, JoinMode.SYNC: 24 * 3600.0}


@dataclass(frozen=True)
class SessionSettings:
    address: str = "127.0.0.1:50051"  # where the arbiter listens and parties dial (host:port)
    session: str = "fedfleet"  # every party must join with the same session id
    certs: str | None = "certs"  # folder from `fedfleet certs`: ca.crt, <name>.crt, <name>.key (None: plaintext)
    min_parties: int | None = None  # answers a round needs to commit (default: the cohort / every party)
    round_timeout: float | None = None  # seconds a round waits for updates (None: ROUND_TIMEOUT by pacing)
    join_timeout: float = 60.0  # seconds a round waits for selected parties that are not connected
    wait_timeout: float = 3600.0  # seconds the arbiter waits for parties before it gives up
    max_weight: float = 1.0e9  # an update claiming more examples than this is rejected
    max_weight_ratio: float | None = None  # a party's weight is cut to this many times the others' median
    max_update_norm: float | None = None  # a delta with a longer L2 norm is rejected
    receive_buffers: int = 4  # uploads received at once (each holds a model-sized buffer at the arbiter)
    upload_stall_s: float = 30.0  # an upload that sends nothing for this long loses its buffer, refused
    chunk_mib: float = 4.0  # params travel in chunks of this size
    heartbeat_s: float = 5.0  # a party's keep-alive interval
    reconnect_max_s: float = 30.0  # a party retries a lost arbiter with backoff up to this delay
    give_up_s: float = 600.0  # a party stops when it has not reached the arbiter for this long

    key_prefix: ClassVar[str] = ""  # how errors name the keys ("network." in a job file)

    def __post_init__(self) -> None:
        p = self.key_prefix
        if not re.fullmatch(r"\[?[A-Za-z0-9.:_-]*\]?:\d+", self.address):
            raise ValueError(f"{p}address must be host:port, got {self.address!r}")
        for key in ("min_parties", "round_timeout", "join_timeout", "wait_timeout", "max_weight", "heartbeat_s",
                    "reconnect_max_s", "max_weight_ratio", "max_update_norm", "receive_buffers",
                    "upload_stall_s", "give_up_s"):  # fmt: skip
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{p}{key} must be > 0, got {value}")
        if self.max_weight_ratio is not None and self.max_weight_ratio < 1:
            raise ValueError(f"{p}max_weight_ratio must be at least 1, got {self.max_weight_ratio}")
        if not 0.0625 <= self.chunk_mib <= 16:
            raise ValueError(f"{p}chunk_mib must be in [0.0625, 16], got {self.chunk_mib}")

    def round_timeout_s(self, mode: JoinMode) -> float:
        """The round timeout in seconds for a session paced as ``mode``."""
        return self.round_timeout if self.round_timeout is not None else ROUND_TIMEOUT[mode]

    def server_limits(self) -> dict[str, float | int | None]:
        """What the arbiter's server enforces on each party's answers, as ``ArbiterServer`` keywords."""
        return {
            "max_weight": self.max_weight,
            "max_update_norm": self.max_update_norm,
            "receive_buffers": self.receive_buffers,
            "upload_stall_s": self.upload_stall_s,
        }

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mib * (1 << 20))


DEFAULTS = SessionSettings()
