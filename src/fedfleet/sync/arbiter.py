"""The arbiter of a party-driven (sync mode) session: parties train on their own schedule and call
``ctx.sync(params, weight)``; the arbiter folds each round's updates with the usual strategies.

The arbiter needs no model and no data: the param layout and the initial params come from the first party
that joins, and the other parties must match that layout (a different architecture is refused at join,
with the first differing tensors named). The number of rounds is the job's, or what the parties announce.

Secure aggregation (SecAgg+, ``secure_aggregation``): every round runs the stages of the server-driven secure
rounds (``runtime/grpc/secure_runtime.py``), paced by the parties: when a round opens (the parties are at their
sync, waiting for its params) their keys and sealed shares are exchanged, its sync task follows, each party's
training loop answers it with its masked delta at its next sync, and the arbiter unmasks only the sum. Left to
the parties (the default), the session is secure when every party asks for it (``FedArguments(aggregator=
"secure")``) and plain when none does; a mix is refused, naming who asked for which.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import Callback, LoopConfig, RoundLoop, RoundRecord
from fedfleet.core.params import FlatParams
from fedfleet.core.pipeline import Pipeline
from fedfleet.errors import ConfigError
from fedfleet.runtime.grpc import GrpcRuntime
from fedfleet.runtime.grpc.runtime import PartiesMissingError
from fedfleet.runtime.grpc.secure_arbiter import SecureArbiterServer
from fedfleet.runtime.grpc.secure_identity import Verifier
from fedfleet.runtime.grpc.settings import SessionSettings
from fedfleet.runtime.grpc.tls import ARBITER_NAME, server_credentials
from fedfleet.runtime.grpc.wire import JoinMode
from fedfleet.secagg.config import SecAggConfig, check_cohorts, for_parties
from fedfleet.select import build_selector
from fedfleet.strategy import Strategy, build_strategy

log = logging.getLogger("fedfleet.arbiter")


@dataclass(frozen=True)
class SyncSessionConfig(SessionSettings):
    """A party-paced session: the deployed ``SessionSettings`` (address, session, certs, timeouts, ... with
    their one set of defaults; ``min_parties`` defaults to every party, the round timeout to a day) and:"""

    parties: Sequence[str] = ()
    rounds: int | None = None  # None: as many as the parties announce (they must agree)
    strategy: Strategy | str = "fedavg"
    pipeline: Pipeline | None = None  # fold transforms around the strategy's aggregator (core.pipeline)
    seed: int = 0
    callbacks: Sequence[Callback] = field(default_factory=tuple)
    # the arbiter's own initial params (it then fixes the layout and asks no party); None: the first party's
    initial: FlatParams | None = None
    # SecAgg+: None as the parties ask (all the same, checked once they joined), True with the settings the parties
    # derive from their count (secagg.config.for_parties), a SecAggConfig with these, False plain only
    secure_aggregation: SecAggConfig | bool | None = None
    # the most ranks a sharded (FSDP) party may have, each exchanging its own shard on a stream of its own
    rank_streams: int = 8


class SyncArbiter:
    """``SyncArbiter(config).serve()``: listen, take the initial params, run every round, send the final model."""

    def __init__(self, config: SyncSessionConfig) -> None:
        if not config.parties:
            raise ConfigError("a session needs at least one party (e.g. parties=['guest-9999', 'host-10000'])")
        self.config = config
        self.min_parties = config.min_parties or len(config.parties)
        if self.min_parties > len(config.parties):
            raise ConfigError(f"min_parties {self.min_parties} is larger than the {len(config.parties)} parties")
        wish = config.secure_aggregation
        # the settings a secure session runs with: given, or what every party derives from the party count
        offer = wish if isinstance(wish, SecAggConfig) else None if wish is False else for_parties(len(config.parties))
        explicit = wish is not None and wish is not False
        if explicit:  # k and t for every round size the session may run with, before anything starts
            check_cohorts(offer, self.min_parties, len(config.parties), key="min_parties")
        credentials = None if config.certs is None else server_credentials(config.certs, ARBITER_NAME)
        self.server = SecureArbiterServer(
            session=config.session,
            parties=list(config.parties),
            spec=None if config.initial is None else config.initial.spec,
            address=config.address,
            credentials=credentials,
            **config.server_limits(),
            mode=JoinMode.SYNC,
            rank_streams=config.rank_streams,
            secure_aggregation=offer,
            verifier=None if config.certs is None else Verifier(config.certs, config.parties),
            parties_decide=wish is None,
        )
        self.runtime = GrpcRuntime(
            self.server,
            min_parties=self.min_parties,
            round_timeout=config.round_timeout_s(JoinMode.SYNC),
            join_timeout=config.join_timeout,
            wait_timeout=config.wait_timeout,
            max_weight_ratio=config.max_weight_ratio,
            chunk_bytes=config.chunk_bytes,
            secure_aggregation=offer if explicit else None,
        )
        self.loop: RoundLoop | None = None
        self._joins_awaited = False

    @property
    def port(self) -> int:
        return self.server.port

    def serve(self) -> list[RoundRecord]:
        """Run the session to its end; returns the per-round records (aggregated party metrics)."""
        self.server.start()
        try:
            if self.config.initial is not None:
                self._await_parties(every=False)  # the announced rounds come with the joins
                initial = self.config.initial.clone()
            else:
                initial = self.runtime.initial_params()
            rounds = self.config.rounds or self._announced_rounds()
            self.server.rounds = rounds
            self._settle_secure()
            strategy = self.config.strategy
            self.loop = RoundLoop(
                build_strategy(strategy) if isinstance(strategy, str) else strategy,
                self.runtime,
                build_selector("uniform"),
                initial,
                FitConfig(),
                LoopConfig(rounds=rounds, cohort=len(self.config.parties), seed=self.config.seed, eval_every=0),
                self.config.callbacks,
                pipeline=self.config.pipeline,
            )
            history = self.loop.run()
            self.runtime.finish(final_params=self.loop.global_params)
            return history
        except BaseException as exc:
            # tell the connected parties why, or they would wait and redial for many minutes
            with contextlib.suppress(Exception):
                self.runtime.finish(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, failed=True)
            raise
        finally:
            self.server.stop(grace=5.0)

    def distribute(self) -> None:
        """A hand-out session: send ``initial`` once to every party (which takes it with ``SyncParty.fetch``) and
        end, with no rounds. Offsite-Tuning's model owner sends the sub model this way."""
        if self.config.initial is None:
            raise ConfigError("distribute() sends the arbiter's own params: give SyncSessionConfig(initial=...)")
        self.server.start()
        try:
            self._await_parties(every=True)
            self.runtime.finish("handed out", final_params=self.config.initial)
        except BaseException as exc:  # as in serve(): the parties already there would wait and redial for long
            with contextlib.suppress(Exception):
                self.runtime.finish(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, failed=True)
            raise
        finally:
            self.server.stop(grace=self.config.wait_timeout)  # returns once every party has read to the end

    def _await_parties(self, every: bool) -> None:
        need = len(self.config.parties) if every else 1
        with self.server.changed:
            ok = self.server.changed.wait_for(lambda: len(self.server.connected()) >= need, self.config.wait_timeout)
        if not ok:
            missing = sorted(set(self.config.parties) - set(self.server.connected()))
            raise PartiesMissingError(
                f"session {self.config.session}: {', '.join(missing)} did not connect within "
                f"{self.config.wait_timeout:.0f} s; are they started, and do they dial port {self.server.port}?"
            )

    def _await_joins(self) -> None:
        """Until every party that may come joined, or join_timeout passed: what the parties announce is read
        then, so the first party to join cannot decide it for the others."""
        if self._joins_awaited:
            return
        coming = [name for name in self.config.parties if name not in self.server.refused]
        with self.server.changed:
            self.server.changed.wait_for(
                lambda: len(self.server.connected()) >= len(coming),
                min(self.config.join_timeout, self.config.wait_timeout),
            )
        self._joins_awaited = True

    def _settle_secure(self) -> None:
        """Left to the parties: secure when every party that joined asked for it, plain when none did, a mix
        refused by name (``SecureArbiterServer.settle_secure``); later parties must say the same."""
        if not self.server.secure_undecided:
            return
        self._await_joins()
        config = self.server.settle_secure()
        if config is not None:
            check_cohorts(config, self.min_parties, len(self.config.parties), key="min_parties")
            log.info("secure aggregation, as every party asks: %s", config)
        self.runtime.secure(config)

    def _announced_rounds(self) -> int:
        """The number of syncs most connected parties announced, once every party joined (or join_timeout
        passed): the first party to join cannot fix the session's length for the others. Parties that
        announced another number are refused; a tie cannot be decided."""
        self._await_joins()
        connected = set(self.server.connected())
        wanted = {name: n for name, n in self.server.rounds_wanted.items() if n > 0 and name in connected}
        if not wanted:
            raise ConfigError("no party announced how many times it syncs; give the arbiter rounds=")
        (top, votes), *others = Counter(wanted.values()).most_common()
        if others and others[0][1] == votes:
            raise ConfigError(
                f"the parties plan different numbers of syncs ({wanted}); give them the same training length and "
                f"aggregation frequency, or give the arbiter rounds="
            )
        for name, n in wanted.items():
            if n != top:
                self.server.refuse(name, f"{name} plans {n} syncs but most parties plan {top}; give every party "
                                   f"the same training length and aggregation frequency")  # fmt: skip
        return top
