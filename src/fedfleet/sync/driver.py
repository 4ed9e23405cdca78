"""The one sync driver under the Hugging Face and Lightning adapters (and Offsite-Tuning on top of them).

A party's training loop tells the driver where it is (``plan`` at the start, ``due`` after each optimizer
step) and hands it the round's weight and metrics; the driver does the rest the same way for every
framework:

- the schedule: after which optimizer steps the party syncs (``FedArguments.sync_steps``), resumed runs
  included;
- the exchange: every rank gathers its params (a collective under DeepSpeed), global rank 0 alone talks to
  the arbiter (letting the other in-process parties train meanwhile), then broadcasts what happened and
  the aggregate, and every rank scatters it into the model;
- failures: when rank 0's talk fails, it broadcasts that before raising, so every other rank raises at once
  ("rank 0 failed to sync ...") instead of waiting in a broadcast until the process group's timeout;
- the end: the arbiter's last aggregate stops training at the run's end, or early with a warning;
- turns: in-process parties (a ``LocalFederation``) take turns with their own random state.

An adapter says only where the params live (a ``ParamAccess``) and what its ranks are (``Ranks``).

A sharded access (``access.sharded``: an FSDP party's ``DTensorBoxes``) over a context with a
``sharded_channel`` (the folder's ``FileContext``, the gRPC ``Context``) takes the other path: nothing is gathered
or broadcast, every rank reads and writes (or receives and sends, on a stream of its own) its own boxes, rank 0
announces the update (its weight and metrics) once all have written, and a failure on any rank is raised on all.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fedfleet.core.pipeline import Pipeline
from fedfleet.core.update import TrainStats
from fedfleet.errors import ConfigError
from fedfleet.sync.access import ParamAccess
from fedfleet.sync.args import FedArguments, steps_text

log = logging.getLogger("fedfleet.sync")

GOING, ENDED, FAILED = 1, 0, -1  # what rank 0 broadcasts after talking to the arbiter
CPU = torch.device("cpu")


class RankFailed(RuntimeError):
    """Raised on the other ranks of a party whose rank 0 could not sync (rank 0 raises its own error)."""


@dataclass(frozen=True)
class Ranks:
    """The processes of one party: how many, whether this is global rank 0, where collectives' tensors live
    (gloo reduces CPU tensors, NCCL CUDA ones)."""

    world: int = 1
    is_main: bool = True
    device: torch.device = CPU
    rank: int = 0

    @staticmethod
    def of(world_size: int, is_main: bool, device: torch.device) -> Ranks:
        """``world_size`` as the framework reports it, counted only when a process group is up."""
        up = dist.is_available() and dist.is_initialized()
        return Ranks(world_size if up else 1, is_main, device)

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            dist.broadcast(tensor, src=0)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(tensor)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, picklable: made by fedfleet on the party's own ranks), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def end_process_group() -> None:
    """End this process's torch.distributed group and free what still holds it, while the interpreter is whole.

    Call it last on every rank (after ``main()`` returns, when the model is out of scope). Why: FSDP modules and
    device meshes sit in reference cycles, so without a collection their gloo group is freed only during the
    interpreter's exit; a gloo worker thread ending then is killed by ``pthread_exit`` through a C++ frame that
    may not unwind, and the process dies of SIGABRT ("terminate called without an active exception": seen in gdb,
    thread ``pt_gloo_runloop`` in ``__do_cancel`` during ``Py_FinalizeEx``), turning a finished job into exit code
    -6, which a scheduler reports as a failure. About 1 exit in 20 did so on a 2-core machine before this (2 of
    36 exits of a 2-rank save script; 0 of 100 with it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


class SyncDriver:
    """One party's syncs with the session ``ctx`` (gRPC ``Context`` or ``LocalFederation`` context)."""

    def __init__(
        self, ctx: Any, fed_args: FedArguments, timeout: float | None = None, update_transforms: Sequence[Any] = ()
    ) -> None:
        """``update_transforms``: the party-side chain of the aggregation pipeline (clip, ...), applied to each
        delta rank 0 sends."""
        self.ctx = ctx
        self.pipeline = Pipeline(client=tuple(update_transforms))
        self.fed_args = fed_args
        self.timeout = timeout  # seconds to wait for the others at a sync (None: the context's limit)
        self.name = getattr(ctx, "name", "party")
        self.schedule: tuple[int, ...] = ()  # the optimizer steps after which this party syncs
        self.syncs = 0
        self.ended = False  # the arbiter sent its final aggregate
        self.access: ParamAccess | None = None
        self.ranks = Ranks()
        self.channel: Any = None
        self.vocab = ""  # the fingerprint of the party's token ids (set by the HF adapter from its tokenizer)
        self._turn: Any = None

    @property
    def rounds(self) -> int:
        return len(self.schedule)

    def due(self, step: int) -> bool:
        """Whether the party syncs at the end of optimizer step ``step``."""
        return not self.ended and self.syncs < len(self.schedule) and step >= self.schedule[self.syncs]

    # -- the run -------------------------------------------------------------------------------------
    def enter_turn(self, seed: int) -> None:
        """In-process parties train in turns from here, with their own random state seeded from ``seed``
        (the context's ``turn``); nothing for networked parties."""
        make = getattr(self.ctx, "turn", None)
        if self._turn is None and make is not None:
            self._turn = make(seed)
            if self._turn is not None:
                self._turn.__enter__()

    def leave_turn(self) -> None:
        if self._turn is not None:  # let the other in-process parties finish
            turn, self._turn = self._turn, None
            turn.__exit__(None, None, None)

    def start(
        self, access: ParamAccess, ranks: Ranks, total_steps: int, steps_per_epoch: int, step: int, seed: int = 0
    ) -> None:
        """Plan the syncs, join the session on rank 0 and load its initial params on every rank; ``seed``: the
        party's, for randomised transforms."""
        self.access, self.ranks = access, ranks
        self.schedule = self.fed_args.sync_steps(total_steps, steps_per_epoch, start=step)
        sharded = self.sharded
        spec = access.spec if sharded else access.params.spec
        log.info(
            "%s: %d syncs of %d tensors (%.2f MB), after optimizer steps %s",
            self.name,
            self.rounds,
            len(spec),
            spec.nbytes / 1e6,
            steps_text(self.schedule),
        )
        if sharded:
            self._check_sharded()
            self.channel = self.ctx.sharded_channel(spec, self.rounds, ranks.rank, ranks.world)  # every rank its own
            self._in_step(lambda: self.channel.start(access.pieces, self.timeout))
            return
        if ranks.is_main:
            extra: dict[str, Any] = {"pipeline": self.pipeline, "seed": seed} if self.pipeline.client else {}
            if self.vocab:  # checked against the other parties' when joining
                extra["vocab"] = self.vocab
            if self.fed_args.secure:  # the session must mask every party's update (all parties must agree)
                extra.update(secure=True, seed=seed)  # the seed drives the quantiser's rounding, as in simulation
            self.channel = self.ctx.channel(spec, self.rounds, **extra)
        self._exchange(lambda: self.channel.start(access.params, self.timeout))

    def sync(self, weight: float, stats: TrainStats, metrics: dict[str, float] | None = None) -> bool:
        """Send this round's params, load the aggregate on every rank; False once the session is over."""
        if self.sharded:
            going = self._sync_sharded(weight, stats, metrics)
            self.syncs += 1
            self.ended = self.ended or not going
            return going
        params = self.access.params
        going = self._exchange(lambda: self.channel.sync(params, weight, metrics, self.timeout, stats=stats))
        self.syncs += 1
        if not going:
            self.ended = True
        return going

    def close(self) -> None:
        """Leave the session (also after a failure: the others must not wait for us) and the turns."""
        if self.channel is not None:
            channel, self.channel = self.channel, None
            channel.close()
        self.leave_turn()

    # -- internals -----------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether every rank exchanges its own boxes (a sharded access and a context that can)."""
        return bool(getattr(self.access, "sharded", False)) and hasattr(self.ctx, "sharded_channel")

    def _check_sharded(self) -> None:
        if self.pipeline.client:
            raise ConfigError(
                "update_transforms need the whole update on one rank; the sharded exchange never gathers it: "
                "drop them, or exchange='gathered'"
            )
        if self.fed_args.secure:
            raise ConfigError("secure aggregation masks the whole update on one rank: exchange='gathered'")

    def _sync_sharded(self, weight: float, stats: TrainStats, metrics: dict[str, float] | None) -> bool:
        """Each rank writes its boxes; rank 0 announces them all; each rank loads its boxes of the next global."""
        pieces = self.access.pieces
        written = self._in_step(lambda: self.channel.write(pieces))
        # the folder's manifest lists every rank's file; over gRPC each rank sends its own part: nothing to gather
        everyone = self.ranks.gather_objects(written) if self.channel.lists_rank_files else []
        main = self.ranks.is_main
        self._in_step(lambda: self.channel.announce(everyone, weight, metrics, stats) if main else None)
        return self._in_step(lambda: self.channel.next(pieces, self.timeout), agree=True)

    def _in_step(self, work: Callable[[], Any], agree: bool = False) -> Any:
        """``work`` on every rank, then one all-reduce: if it failed on any rank, it fails on all (each other rank
        raises RankFailed, not a hang at the next collective). ``agree``: every rank's True or False must match."""
        result, error = None, None
        try:
            result = work()
        except BaseException as exc:
            error = exc
        flags = torch.tensor([error is not None, result is True, result is False], device=self.ranks.device)
        self.ranks.all_reduce(flags)
        failed, yes, no = (int(v) for v in flags.tolist())
        if error is not None:
            raise error
        if failed:
            raise RankFailed(f"{self.name}: {failed} other rank(s) failed to sync (their own errors say why)")
        if agree and yes and no:
            raise RankFailed(f"{self.name}: the ranks disagree on whether the session goes on")
        return result

    def _exchange(self, talk: Callable[[], Any]) -> bool:
        """Gather on every rank, talk to the arbiter on rank 0, broadcast the outcome, scatter on every rank."""
        self.access.gather()
        state, error = GOING, None
        if self.ranks.is_main:
            try:
                with self._turn.released() if self._turn is not None else contextlib.nullcontext():
                    state = GOING if talk() is not False else ENDED
            except BaseException as exc:  # tell the other ranks before raising, or they wait in the broadcast
                state, error = FAILED, exc
        if self.ranks.world > 1:
            flag = torch.tensor([state], device=self.ranks.device)
            self.ranks.broadcast(flag)
            state = int(flag.item())
            if state != FAILED:
                for buf in self.access.params.buffers.values():
                    self.ranks.broadcast(buf)
        if error is not None:
            raise error
        if state == FAILED:
            raise RankFailed(f"{self.name}: rank 0 failed to sync with the arbiter (its own error says why)")
        self.access.scatter()
        return state == GOING
