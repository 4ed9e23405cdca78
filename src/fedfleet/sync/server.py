"""FATE-LLM's FedAVGServer: the arbiter of a Hugging Face (or Lightning) federation.

It imports no transformers: an arbiter holds no model, so it starts in the time the gRPC runtime takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfleet.core.loop import RoundRecord
from fedfleet.core.serialize import save_params
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc.settings import DEFAULTS
from fedfleet.secagg.config import SecAggConfig
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
        join_timeout: float = DEFAULTS.join_timeout,
        secure_aggregation: SecAggConfig | None = None,
    ) -> None:
        """``wait_timeout``: seconds a round waits for a party that is not connected (it died, or was not started)
        before the session ends; ``join_timeout``: seconds it waits before going on without it when enough
        parties are there (``min_parties``), or before it ends when the missing party was refused.

        Secure aggregation: without ``fed_args`` the session is secure when every party's
        ``FedArguments(aggregator="secure")`` asks for it (a mix is refused by name); ``fed_args`` fixes it for
        the parties to match, and ``secure_aggregation`` fixes the SecAgg+ settings (k, t, clip, bits), which the
        parties' ``ctx.channel(secure=...)`` must then give too."""
        if not ctx.is_arbiter:
            raise ConfigError(f"FedAvgServer runs on the arbiter; this context is {ctx.name}'s")
        self.ctx = ctx
        secure: SecAggConfig | bool | None = None if fed_args is None else fed_args.secure
        if secure_aggregation is not None:
            secure = secure_aggregation
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
                join_timeout=join_timeout,
                pipeline=pipeline,
                secure_aggregation=secure,
            )
        )

    def train(self) -> list[RoundRecord]:
        return self.arbiter.serve()

    def save_model(self, output_dir: str | Path) -> Path:
        """Write the session's final global params (the tensors the parties exchanged, by name) to
        ``output_dir/model.safetensors`` (FATE-LLM's ``FedAVGServer.save_model``); returns the file's path.

        The arbiter holds no model: this is what it folded, e.g. the LoRA adapters of a PEFT session, which a
        party's model loads with ``load_state_dict(..., strict=False)``."""
        loop = self.arbiter.loop
        if loop is None or loop.round == 0:
            raise ConfigError("save_model comes after train(): no round has been aggregated yet")
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.safetensors"
        save_params(loop.global_params, path, metadata={"rounds": str(loop.round), "session": self.ctx.session_id})
        return path
