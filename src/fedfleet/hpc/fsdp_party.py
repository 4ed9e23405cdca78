"""``FSDPParty``: a data owner that trains a model sharded with FSDP2 and federates like the other parties.

Every rank of the party (torchrun, srun, or processes a script starts with the torchrun variables) runs::

    ctx = create_context(("guest", "9999"), parties, session_id="s1", arbiter_address="arbiter:50051")
    party = FSDPParty(ctx, model, FedArguments("epoch", 1), FSDPConfig("HYBRID_SHARD", precision="auto"))
    party.fit(train_set, epochs=2, batch_size=4, lr=2e-4)

The model is sharded (``fedfleet.hpc.fsdp``), trained by the loop below (micro-batches, one optimizer step per
``grad_accum_steps``), and synced by the same ``SyncDriver`` as the Hugging Face and DeepSpeed parties: the same
schedules (``FedArguments``), the same arbiter and strategies, only the trainable params exchanged.

How the params travel (``exchange=``): ``"sharded"``, the default where the context can (the gRPC ``Context``:
every rank on a stream of its own; the folder's ``FileContext``), has every rank send or write its own boxes of
the update and receive or read only its boxes of the next global, so no rank ever holds the whole model for a
sync; ``"gathered"`` all-gathers the exchanged params on every rank, rank 0 talks to the arbiter and broadcasts
the aggregate. Scripts
with a loop of their own call ``begin`` once and ``end_step`` after each optimizer step instead of ``fit``.

Why not the HF Trainer's ``fsdp=``: on a CPU accelerate leaves the model unsharded (plain parameters, no
DTensor; measured with transformers 5.24 and gloo), so no CPU test could check it; this loop runs the same FSDP2
code on a laptop, a CI machine and a GPU node.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, DistributedSampler

from fedfleet.core.params import Selector
from fedfleet.core.update import TrainStats
from fedfleet.errors import ConfigError
from fedfleet.hpc.fsdp import FSDPConfig, build_mesh, init_distributed, party_device, shard_model
from fedfleet.hpc.fsdp_access import DTensorAccess, DTensorBoxes
from fedfleet.hpc.precision import compute_dtype, mixed_precision_policy
from fedfleet.sync.args import FedArguments
from fedfleet.sync.driver import Ranks, SyncDriver
from fedfleet.sync.threads import PartyThreads, check_threads, choose_threads

log = logging.getLogger("fedfleet.hpc")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class SyncRecord:
    """One sync as this party saw it: after optimizer ``step``, ``weight`` examples (every rank's), the mean
    training loss per micro-batch since the last sync, and the seconds the sync took (waiting included)."""

    step: int
    weight: float
    loss: float
    seconds: float


class FSDPParty:
    """One party of a session (``ctx``: ``create_context``'s, or a ``LocalFederation``'s for a party of one rank).

    ``model`` is sharded in place, on every rank (give every rank the same initial weights, e.g. the same seed or
    ``from_pretrained``; the session's first party's params are loaded into all of them anyway). ``select``: the
    exchanged params (``"trainable"``: those with ``requires_grad``, e.g. LoRA adapters). ``sync_timeout``: seconds
    to wait for the others at a sync. ``update_transforms``: the aggregation pipeline's party-side chain.
    ``threads``: torch's CPU threads (None: 1 for a model under 10M params, as every party on a CPU).
    ``exchange``: ``"auto"`` (sharded where the context can), ``"sharded"`` or ``"gathered"`` (see above)."""

    def __init__(
        self,
        ctx: Any,
        model: nn.Module,
        fed_args: FedArguments | None = None,
        fsdp: FSDPConfig | None = None,
        select: Selector = "trainable",
        sync_timeout: float | None = None,
        update_transforms: Sequence[Any] = (),
        threads: int | None = None,
        exchange: str = "auto",
    ) -> None:
        if getattr(ctx, "is_arbiter", False):
            raise ConfigError("this context is the arbiter's: it does not train; run FedAvgServer(ctx).train() there")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"{type(model).__name__} has no trainable parameters: nothing would be federated")
        self.ctx = ctx
        self.fed_args = fed_args or FedArguments()
        self.config = fsdp or FSDPConfig()
        self.threads = check_threads(threads)
        self.device = party_device(self.config)
        self._owns_group = init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = build_mesh(self.config, self.device, self.world)
        self.dtype = compute_dtype(self.config.precision, self.device)
        self.size = sum(p.numel() for p in model.parameters())
        model.to(self.device)
        self.model = shard_model(model, self.config, self.mesh, mixed_precision_policy(self.dtype))
        self.exchange = _exchange_kind(exchange, ctx)
        sharded = self.exchange == "sharded"  # no full-size buffer on any rank then
        self.access = DTensorBoxes(self.model, select, self.rank) if sharded else DTensorAccess(self.model, select)
        self.driver = SyncDriver(ctx, self.fed_args, sync_timeout, update_transforms)
        self.history: list[SyncRecord] = []
        self.traffic: dict[str, int] = {}  # bytes of published files this rank read and wrote (sharded exchange)
        self.start_seconds = 0.0  # joining the session and loading its initial params (waiting for the others)
        self.step = 0
        # since the last sync, on this rank: examples, micro-batches, and the loss sum (a tensor on the device: no
        # device sync per micro-batch, only at a sync)
        self._examples, self._batches = 0, 0
        self._loss_sum: torch.Tensor | float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- a loop of the script's own ------------------------------------------------------------------
    def trainable_params(self) -> list[nn.Parameter]:
        """The params an optimizer must hold: the sharded ones. After a forward without a backward (an evaluation
        under ``no_grad``) FSDP2 leaves the root unit's params gathered, and ``model.parameters()`` would then
        give its temporary full tensors: an optimizer built from those never trains the embeddings or the head
        (measured: held-out perplexity stuck near its initial value). So every unit is resharded first."""
        reshard(self.model)
        return [p for p in self.model.parameters() if p.requires_grad]

    def begin(self, total_steps: int, steps_per_epoch: int, step: int = 0, seed: int = 0) -> None:
        """Plan the syncs of a run of ``total_steps`` optimizer steps and load the session's initial params on
        every rank (a collective). ``step``: where a resumed run starts. Build the optimizer from
        :meth:`trainable_params`."""
        reshard(self.model)  # the shards are what the sync reads and writes: no gathered copy may outlive them
        ranks = Ranks(self.world, self.is_main, self.access.device, self.rank)
        self.driver.enter_turn(seed)  # in-process parties (a LocalFederation) train in turns; nothing over gRPC
        started = time.perf_counter()
        self.driver.start(self.access, ranks, total_steps, steps_per_epoch, step, seed)
        self.start_seconds = time.perf_counter() - started
        self.step = step

    def count(self, examples: int, loss: torch.Tensor | float | None = None) -> None:
        """One micro-batch of ``examples`` trained on by this rank, with its (unscaled) loss."""
        self._examples += examples
        if loss is not None:
            self._loss_sum = self._loss_sum + (loss.detach().float() if isinstance(loss, torch.Tensor) else loss)
            self._batches += 1

    def end_step(self, step: int | None = None) -> bool:
        """Call after each optimizer step on every rank: syncs when the schedule says so (a collective then).
        False once the session is over: stop training."""
        self.step = self.step + 1 if step is None else step
        if not self.driver.due(self.step):
            return not self.driver.ended
        device = self.access.device  # gloo reduces CPU tensors, NCCL GPU ones
        since = torch.tensor([self._examples, 0.0, self._batches], dtype=torch.float64, device=device)
        since[1] = self._loss_sum if isinstance(self._loss_sum, torch.Tensor) else float(self._loss_sum)
        if self.world > 1:  # the party's weight is every rank's examples
            dist.all_reduce(since)
        examples, loss_sum, batches = since.tolist()
        loss = loss_sum / batches if batches else math.nan
        started = time.perf_counter()
        reshard(self.model)  # the new global values go into the shards; a gathered copy would hide them
        going = self.driver.sync(max(1.0, examples), TrainStats(loss=None if math.isnan(loss) else loss))
        self.history.append(SyncRecord(self.step, max(1.0, examples), loss, time.perf_counter() - started))
        self._examples, self._batches, self._loss_sum = 0, 0, 0.0
        return going

    def close(self) -> None:
        """Leave the session (also after a failure, so the others do not wait for this party) and the turns."""
        channel = self.driver.channel
        if channel is not None and hasattr(channel, "bytes_read"):  # the sharded exchange counts this rank's I/O
            self.traffic = {"read": channel.bytes_read, "written": channel.bytes_written}
        self.driver.close()

    # -- the loop ------------------------------------------------------------------------------------
    def fit(
        self,
        train_set: Any,
        epochs: int = 1,
        batch_size: int = 8,
        lr: float = 1e-4,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        loss_fn: LossFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        seed: int = 0,
        max_steps: int | None = None,
    ) -> list[SyncRecord]:
        """Train ``epochs`` over ``train_set`` (each rank its share, ``batch_size`` examples per micro-batch) and
        sync on the schedule; returns the syncs. ``optimizer``: builds the optimizer from the trainable params
        (default AdamW at ``lr``); ``loss_fn(model, batch)``: default ``model(**batch).loss`` (a Hugging Face
        model given dicts with ``labels``)."""
        if epochs < 1:
            raise ConfigError(f"epochs={epochs}: train at least one epoch")
        sampler = DistributedSampler(train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)
        loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True)
        if len(loader) == 0:
            raise ConfigError(
                f"{len(train_set)} examples make no batch of {batch_size} on each of the party's {self.world} ranks"
            )
        accum = self.config.grad_accum_steps
        per_epoch = math.ceil(len(loader) / accum)
        total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
        trainable = self.trainable_params()
        opt = optimizer(trainable) if optimizer is not None else torch.optim.AdamW(trainable, lr=lr)
        loss_of = loss_fn or _model_loss
        threads = choose_threads(self.size, self.device, 1, self.threads)
        self.model.train()
        try:
            with PartyThreads(threads, getattr(self.ctx, "name", "party")):
                self.begin(total, per_epoch, seed=seed)
                going = True
                for epoch in range(epochs):
                    sampler.set_epoch(epoch)
                    for group in _steps(loader, accum):
                        for i, batch in enumerate(group):
                            self.model.set_requires_gradient_sync(i == len(group) - 1)  # reduce once per step
                            batch = _to(batch, self.device)
                            loss = loss_of(self.model, batch)
                            (loss / len(group)).backward()
                            self.count(_examples(batch), loss)
                        opt.step()
                        opt.zero_grad()
                        going = self.end_step()
                        if not going or self.step >= total:
                            break
                    if not going or self.step >= total:
                        break
                if not going and self.step < total:
                    log.warning("the arbiter ended the session at step %d of %d; training stops", self.step, total)
        finally:
            self.close()
        return self.history

    def destroy(self) -> None:
        """End the process group if this party started it (call once, at the script's end, on every rank; then
        ``fedfleet.sync.end_process_group()`` once the model is out of scope, or in place of this)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


EXCHANGES = ("auto", "sharded", "gathered")


def _exchange_kind(exchange: str, ctx: Any) -> str:
    """``exchange=`` resolved for ``ctx``: "sharded" needs a context with a ``sharded_channel``."""
    if exchange not in EXCHANGES:
        raise ConfigError(f"exchange={exchange!r}: one of {', '.join(EXCHANGES)}")
    can = hasattr(ctx, "sharded_channel")
    if exchange == "sharded" and not can:
        raise ConfigError(
            f"exchange='sharded' needs a context whose ranks reach the exchange themselves (the folder's "
            f"FileContext); {type(ctx).__name__} syncs through rank 0: use exchange='gathered'"
        )
    return "sharded" if exchange == "sharded" or (exchange == "auto" and can) else "gathered"


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered params, so the module's params are its shards again (a no-op when they
    are already)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, dict):
        raise ConfigError("batches that are not dicts need loss_fn=(model, batch) -> loss")
    return model(**batch).loss


def _steps(loader: DataLoader, accum: int) -> Iterator[list[Any]]:
    """The loader's micro-batches in groups of ``accum`` (the epoch's last group may be shorter)."""
    group: list[Any] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _examples(batch: Any) -> int:
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    first = next((v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 1
