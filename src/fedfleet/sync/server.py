"""FATE-LLM's FedAVGServer: the arbiter of a Hugging Face (or Lightning) federation.

It imports no transformers: an arbiter holds no model, so it starts in the time the gRPC runtime takes.
"""

from __future__ import annotations

from typing import Any

from fedfleet.core.loop import RoundRecord
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc.settings import DEFAULTS
from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from fedfleet.sync.args import FedArguments
from fedfleet.sync.context import Context


class FedAvgServer:
    """The arbiter: folds the parties' updates every round; needs no model and no data."""

    def __init__(
        self,
        ctx: Context,
        fed_args: FedArguments | None = None,
        rounds: int | None = None,
        strategy: Any = "fedavg",
        min_parties: int | None = None,
        round_timeout: float | None = DEFAULTS.round_timeout,  # None: a day, as for every party-paced session
        wait_timeout: float = DEFAULTS.wait_timeout,
        pipeline: Any = None,
    ) -> None:
        if not ctx.is_arbiter:
            raise ConfigError(f"FedAvgServer runs on the arbiter; this context is {ctx.name}'s")
        self.ctx = ctx
        self.arbiter = SyncArbiter(
            SyncSessionConfig(
                session=ctx.session_id,
                parties=ctx.data_parties,
                address=ctx.arbiter_address,
                certs=ctx.certs,
                rounds=rounds,
                min_parties=min_parties,
                strategy=strategy,
                round_timeout=round_timeout,
                wait_timeout=wait_timeout,
                pipeline=pipeline,
            )
        )

    def train(self) -> list[RoundRecord]:
        return self.arbiter.serve()
