"""Cohort-vectorised simulation: every client of the cohort takes its k-th local step together.

Each exchanged tensor is stacked over the cohort, ``(C, *shape)``, one row per client. A step gathers the
clients' k-th batches as ``C * B`` rows, computes every client's gradients in one forward and one backward, and
updates every row with one optimizer step (``cohort_optim``). Gradients come from one of two engines:

- ``layers`` (``cohort_layers``): the model rebuilt over stacked weights, a ``bmm`` per linear layer and so on.
  Fastest; for models built from the layers in its table (linear, embedding, conv, layer/group norm, any
  parameter-free layer) whose forward treats each sample alone.
- ``vmap``: ``torch.func.vmap(grad(functional_call(...)))`` for any other model torch.func can batch.

Each client follows exactly its sequential trajectory: the same shuffles (same seeds, ``batch_indices``), the
same mean over its real samples (a short last batch is padded with zero-weight samples), the same optimizer rule.
A ragged cohort (clients with fewer batches) is ordered by number of batches, so at step k the clients that still
train are a prefix of the rows and only they are computed and updated.

Supported: a :class:`TorchTrainer` with any of its optimizers (SGD with momentum / weight decay, Adam, AdamW,
Adagrad, RMSprop), FedProx's proximal term, one param dtype, every trainable param exchanged, no
``keep_local`` rows, a loss module with ``reduction`` "mean" or "sum" (and no class weights). Anything else
raises :class:`NotVectorizable`, and ``make_runtime`` falls back to the sequential runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedfleet.client.torch_trainer import TorchTrainer, batch_indices, check_finite_loss
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import TrainStats, Update
from fedfleet.runtime.sim.cohort_layers import CohortModel, NotBatchable, StepInto, check_rows, mixes_samples
from fedfleet.runtime.sim.cohort_optim import STEPS, CohortOptimizer
from fedfleet.runtime.sim.sequential import client_seed

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # stacked weights + gradients of the clients trained at once; past it, chunks of the cohort

# (params (a, *shape) by name, x (a * B, ...), y (a * B,), weights (a, B), gradient buffers (a, *shape) by name)
#   -> trainable grads (in the buffers where the engine can write them), per-sample losses (a, B)
Engine = Callable[[dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Tensor]], tuple[list[Tensor], Tensor]]


class NotVectorizable(Exception):
    """This trainer/model cannot train a cohort at once; the message says why."""


class VectorizedRuntime:
    parties_in_process = True  # secure aggregation can play the parties here (secagg.in_process)

    def __init__(self, trainer: Any, federation: Any, test_data: Any = None, engine: str = "auto") -> None:
        """``engine``: "layers", "vmap", or "auto" (layers where the model allows, else vmap)."""
        _check_supported(trainer)
        self.trainer: TorchTrainer = trainer
        self.federation = federation
        self.test_data = test_data
        self.spec = trainer.params.spec
        (self.dtype,) = self.spec.sizes
        model_params = dict(trainer.model.named_parameters())
        self.names = self.spec.names
        self.trainable = [n for n in self.names if model_params[n].requires_grad]
        # plain SGD is the trainer's flat step over every exchanged tensor (frozen ones too: weight decay and
        # FedProx move them); torch's optimizers step the trainable tensors only
        self.stepped = self.names if trainer.optimizer == "sgd" else self.trainable
        self.loss = copy.copy(trainer.loss)
        self.loss.reduction = "none"
        self.mean = trainer.loss.reduction == "mean"
        self.engine_name, self._engine = self._build_engine(engine)
        # stacked weights and gradients, kept from round to round: cohort-sized tensors allocated afresh each
        # step or round cost their page faults every time (a third of a gradient's matmul on S)
        self._stack: dict[str, Tensor] = {}
        self._grad: dict[str, Tensor] = {}
        self._deltas = torch.empty(0)
        self.chunk: int | None = None  # clients trained at once (None: by CHUNK_BYTES)
        self._x = self._y = torch.empty(0)

    @property
    def population(self) -> int:
        return self.federation.num_clients

    # -- engines ----------------------------------------------------------------------------------
    def _build_engine(self, engine: str) -> tuple[str, Engine]:
        if engine not in ("auto", "layers", "vmap"):
            raise ValueError(f"engine must be 'auto', 'layers' or 'vmap', got {engine!r}")
        _, x, _ = self._probe_rows()
        try:
            mixes = mixes_samples(self.trainer.model, x)
        except Exception as exc:  # the model fails on a few of its own samples: leave it to the trainer's error
            raise NotVectorizable(f"the model fails on a small batch: {exc}") from exc
        if mixes:
            raise NotVectorizable("the model's forward mixes the samples of a batch, which padded batches would change")
        if engine == "vmap":
            return "vmap", self._vmap_engine()
        try:
            return "layers", self._layers_engine()
        except NotBatchable as exc:
            if engine == "layers":
                raise NotVectorizable(str(exc)) from exc
            why = str(exc)
        try:
            grads = self._vmap_engine()
        except NotVectorizable as exc:  # one reason for the one line the fallback logs
            raise NotVectorizable(f"{why}; and {exc}") from exc
        log.info("cohort training through torch.func.vmap: %s", why)
        return "vmap", grads

    def _probe_rows(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Two clients' weights (the model's and a perturbed copy) and a few rows of data for each."""
        fed = self.federation
        k = max(1, min(3, len(fed.y) // 2))
        rows = torch.arange(2 * k, device=fed.y.device) % len(fed.y)
        gen = torch.Generator().manual_seed(0)
        params = {}
        for name, t in self.trainer.params.tensors().items():
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
            params[name] = torch.stack([t.detach(), t.detach() + 0.1 * noise * t.detach().abs().mean()])
        return params, fed.x[rows], fed.y[rows]

    def _layers_engine(self) -> Engine:
        model = self.trainer.model
        cohort = CohortModel(model)
        trainable, loss, mean = self.trainable, self.loss, self.mean

        def grads(params: dict[str, Tensor], x: Tensor, y: Tensor, wb: Tensor, into: dict[str, Tensor]) -> Any:
            a = wb.shape[0]
            leaves = [params[n].detach().requires_grad_() for n in trainable]
            with torch.enable_grad():
                out = cohort.forward({**params, **dict(zip(trainable, leaves, strict=True))}, x, a, into)
                per = loss(out, y).view(a, -1)
                total = (per * wb).sum(1)
                if mean:
                    total = total / wb.sum(1).clamp_min(1.0)
                got = torch.autograd.grad(total.sum(), leaves, allow_unused=True)
            return list(got), per.detach()  # None: unused, or the fused step was taken

        params, x, y = self._probe_rows()
        model.train()
        cohort.train()
        check_rows(cohort, model, params, x)
        try:
            grads(params, x, y, torch.ones(2, len(y) // 2, dtype=self.dtype, device=x.device), {})
        except Exception as exc:  # a kernel whose backward fails on this model's shapes
            raise NotBatchable(f"the cohort model's backward fails: {exc}") from exc
        self._cohort_model = cohort
        return grads

    def _vmap_engine(self) -> Engine:
        model, loss, mean = self.trainer.model, self.loss, self.mean
        trainable = self.trainable
        frozen = [n for n in self.names if n not in set(trainable)]

        def client_loss(train: tuple, fixed: tuple, xb: Tensor, yb: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
            named = {**dict(zip(trainable, train, strict=True)), **dict(zip(frozen, fixed, strict=True))}
            per = loss(functional_call(model, named, (xb,)), yb)
            total = (per * wb).sum()
            return (total / wb.sum().clamp_min(1.0) if mean else total), per.detach()

        batched = vmap(grad_and_value(client_loss, has_aux=True))

        def grads(params: dict[str, Tensor], x: Tensor, y: Tensor, wb: Tensor, into: dict[str, Tensor]) -> Any:
            a = wb.shape[0]
            train = tuple(params[n] for n in trainable)
            fixed = tuple(params[n] for n in frozen)
            got, (_, per) = batched(train, fixed, x.view(a, -1, *x.shape[1:]), y.view(a, -1), wb)
            return list(got), per

        params, x, y = self._probe_rows()
        try:
            model.train()
            grads(params, x, y, torch.ones(2, len(y) // 2, dtype=self.dtype, device=x.device), {})
        except Exception as exc:  # vmap raises many kinds of errors for unsupported ops
            raise NotVectorizable(f"torch.func.vmap cannot batch this model: {exc}") from exc
        return grads

    # -- a round ----------------------------------------------------------------------------------
    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]:
        fed, trainer = self.federation, self.trainer
        clients = [int(c) for c in clients]
        if not clients:
            return
        initial = self._initial_losses(global_params, clients) if config.report_initial_loss else None
        idx, weights, order = self._plan(clients, config, fed.y.device)  # (C, S, B), rows in ``order``
        cohort, steps = idx.shape[:2]
        counts = weights.sum(2)  # (C, S) real samples per batch
        active = (counts > 0).sum(0).tolist()  # clients still training at each step: a prefix of the rows
        glob = global_params.tensors()
        self._reserve(cohort, idx.shape[2], fed.y.device)
        stacked = {n: t[:cohort] for n, t in self._stack.items()}
        fused = self._fused(config)
        opt = CohortOptimizer(
            trainer.optimizer,
            [stacked[n] for n in self.stepped],
            config.lr,
            momentum=trainer.momentum,
            weight_decay=trainer.weight_decay,
            proximal_mu=config.proximal_mu,
            anchors=[glob[n].unsqueeze(0) for n in self.stepped],
        )
        moves_frozen = bool(trainer.weight_decay or config.proximal_mu)  # SGD's flat step moves frozen params too
        frozen = torch.zeros_like if moves_frozen else (lambda t: None)
        loss_sum = torch.zeros(cohort, dtype=self.dtype, device=fed.y.device)
        sq_sum = torch.zeros_like(loss_sum)
        # reused round after round, as the sequential trainer reuses its delta buffer client after client: whoever
        # keeps an update copies it (the loop folds it at once); a fresh one cost its page faults each round
        deltas = self._deltas[:cohort]
        trainer.model.train()
        chunk = self._chunk(cohort)
        for lo in range(0, cohort, chunk):  # a chunk of clients takes all its steps while its weights are in cache
            hi = min(lo + chunk, cohort)
            for n, t in stacked.items():
                t[lo:hi].copy_(glob[n].expand_as(t[lo:hi]))
            for s in range(steps):
                a = min(active[s], hi) - lo  # the chunk's clients still training: a prefix of its rows
                if a <= 0:
                    break
                sl = slice(lo, lo + a)
                rows = idx[sl, s].reshape(-1)
                wb = weights[sl, s]
                params = {n: t[sl] for n, t in stacked.items()}
                into = {n: StepInto(params[n], config.lr) if n in fused else self._grad[n][:a] for n in self.trainable}
                xb = torch.index_select(fed.x, 0, rows, out=self._x[: len(rows)])
                yb = torch.index_select(fed.y, 0, rows, out=self._y[: len(rows)])
                grads, per = self._engine(params, xb, yb, wb, into)
                with torch.no_grad():
                    batch_loss = (per * wb).sum(1)
                    sq_sum[sl] += (per.square() * wb).sum(1)
                    # the trainer adds (batch loss) x (batch size): the sum for a mean loss, as it does for "sum"
                    loss_sum[sl] += batch_loss if self.mean else batch_loss * counts[sl, s]
                by_name = dict(zip(self.trainable, grads, strict=True))
                for n, grad in by_name.items():  # None: a fused step was taken, or the param is unused (zero grad)
                    if grad is None and n not in fused:
                        by_name[n] = torch.zeros_like(params[n])
                opt.step(sl, [by_name[n] if n in by_name else frozen(params[n]) for n in self.stepped], s + 1)
            for e in self.spec.entries:  # each client's delta, written straight into its row of the flat layout
                into_rows = deltas[lo:hi, e.offset : e.offset + e.numel]
                torch.sub(stacked[e.name][lo:hi].reshape(hi - lo, -1), glob[e.name].reshape(1, -1), out=into_rows)
        samples = counts.sum(1)
        mean_loss = (loss_sum / samples.clamp_min(1)).tolist()
        mean_sq = (sq_sum / samples.clamp_min(1)).tolist()
        taken = (counts > 0).sum(1).tolist()
        row_of = {c: r for r, c in enumerate(order)}
        for c, cid in enumerate(clients):
            r = row_of[c]
            check_finite_loss(mean_loss[r], config)
            stats = TrainStats(
                samples=float(samples[r]),
                loss=mean_loss[r],
                loss_sq=mean_sq[r],
                initial_loss=initial[c] if initial is not None else None,
            )
            n = len(fed.client(cid).y)
            params = FlatParams(self.spec, {self.dtype: deltas[r]})
            update = Update(params, weight=float(n), metrics={"steps": float(taken[r])}, client_id=cid, stats=stats)
            # the same context the sequential runtime gives the trainer: this client's seed for this round
            local = dataclasses.replace(config, seed=client_seed(config, cid))
            yield trainer.on_party(update, local, cid)

    def _fused(self, config: FitConfig) -> set[str]:
        """Params whose plain-SGD step the layers engine takes inside the backward pass (``StepInto``)."""
        t = self.trainer
        plain = t.optimizer == "sgd" and not (t.momentum or t.weight_decay or config.proximal_mu)
        if not plain or self.engine_name != "layers":
            return set()
        return self._cohort_model.fusable & set(self.trainable)

    def _chunk(self, cohort: int) -> int:
        """Clients trained together, all their steps, before the next ones: ``self.chunk`` if set, else as many as
        keep the stacked weights and gradients within ``CHUNK_BYTES`` (the whole cohort of a small model)."""
        if self.chunk:
            return max(1, min(cohort, self.chunk))
        per_client = 2 * self.spec.nbytes
        return max(1, min(cohort, CHUNK_BYTES // per_client))

    def _reserve(self, cohort: int, batch: int, device: torch.device) -> None:
        """Stacked weight, gradient, delta and batch buffers for at least ``cohort`` clients' batches."""
        fed = self.federation
        if not self._stack or next(iter(self._stack.values())).shape[0] < cohort:
            shapes = {e.name: e.shape for e in self.spec.entries}
            self._stack = {n: torch.empty(cohort, *shapes[n], dtype=self.dtype, device=device) for n in self.names}
            self._grad = {n: torch.empty(cohort, *shapes[n], dtype=self.dtype, device=device) for n in self.trainable}
            self._deltas = torch.empty(cohort, self.spec.sizes[self.dtype], dtype=self.dtype, device=device)
        if len(self._y) < cohort * batch:
            self._x = torch.empty(cohort * batch, *fed.x.shape[1:], dtype=fed.x.dtype, device=device)
            self._y = torch.empty(cohort * batch, dtype=fed.y.dtype, device=device)

    def round_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        if self.test_data is None:
            return {}
        return self.trainer.evaluate(global_params, self.test_data)

    def _plan(self, clients: list[int], config: FitConfig, device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
        """Each client's batches, drawn with the same seeds and order as the sequential trainer, as sample
        indices ``(C, S, B)`` and 0/1 weights, rows ordered by number of batches (most first; ``order[r]`` is
        the cohort position of row r). A short batch is padded with the client's first sample at weight 0."""
        offsets = self.federation.offsets
        plans = []
        for cid in clients:
            start, end = int(offsets[cid]), int(offsets[cid + 1])
            if end == start:
                raise ValueError(f"cannot train on client {cid}: it has no examples")
            gen = torch.Generator().manual_seed(client_seed(config, cid))
            plans.append((start, [b + start for b in batch_indices(end - start, config, gen, torch.device("cpu"))]))
        order = sorted(range(len(clients)), key=lambda c: -len(plans[c][1]))  # stable: ties keep cohort order
        steps = len(plans[order[0]][1])
        bs = config.batch_size
        idx = torch.zeros(len(clients), steps, bs, dtype=torch.long)
        weights = torch.zeros(len(clients), steps, bs)
        for r, c in enumerate(order):
            start, plan = plans[c]
            if all(len(b) == bs for b in plan):  # the common case: full batches, one copy
                idx[r, : len(plan)] = torch.stack(plan)
                weights[r, : len(plan)] = 1.0
                continue
            idx[r] = start
            for s, batch in enumerate(plan):
                idx[r, s, : len(batch)] = batch
                weights[r, s, : len(batch)] = 1.0
        return idx.to(device), weights.to(device=device, dtype=self.dtype), order

    @torch.no_grad()
    def _initial_losses(self, global_params: FlatParams, clients: list[int]) -> list[float]:
        self.trainer.params.copy_(global_params)
        return [self.trainer._mean_loss(self.federation.client(c)) for c in clients]


def _check_supported(trainer: Any) -> None:
    if not isinstance(trainer, TorchTrainer):
        raise NotVectorizable(f"only TorchTrainer can be vectorised, not {type(trainer).__name__}")
    if trainer.local is not None:
        raise NotVectorizable("client.keep_local rows are kept per client between rounds")
    if trainer.optimizer not in STEPS:
        raise NotVectorizable(f"optimizer {trainer.optimizer!r} has no cohort form")
    exchanged = set(trainer.params.spec.names)
    untracked = [n for n, p in trainer.model.named_parameters() if p.requires_grad and n not in exchanged]
    if untracked:
        names = ", ".join(untracked[:3])
        raise NotVectorizable(f"trainable params that are not exchanged ({names}) carry over between clients")
    if len(trainer.params.spec.sizes) != 1:
        raise NotVectorizable("vectorised training needs all params in one dtype")
    if getattr(trainer.loss, "reduction", None) not in ("mean", "sum"):
        raise NotVectorizable("vectorised training needs a loss module with reduction 'mean' or 'sum'")
    if getattr(trainer.loss, "weight", None) is not None:
        raise NotVectorizable("a loss with class weights averages over the weights, not the samples")
    if any(True for _ in trainer.model.buffers()):
        raise NotVectorizable("the model has buffers (e.g. BatchNorm statistics) that a cohort cannot share")
