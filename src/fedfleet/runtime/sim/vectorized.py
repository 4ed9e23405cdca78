"""Cohort-vectorised simulation: every client of the cohort takes its k-th SGD step together.

The cohort's models are rows of one (C, P) tensor; ``torch.func.vmap(grad(...))`` over
``functional_call`` computes all C gradients in one batched forward/backward. Clients with fewer batches
than the longest are masked (their padded samples weigh zero and they take no step), and a short last
batch is padded with zero-weight samples, so each client follows exactly the sequential trajectory: the
same shuffles (same seeds), the same mean-over-real-samples loss, the same SGD rule.

Supported: a :class:`TorchTrainer` with plain SGD (momentum, weight decay, FedProx), one param dtype, all
trainable params exchanged, a loss module with a ``reduction`` attribute, and a model that vmap accepts
(no in-place buffer updates such as BatchNorm's running stats). Anything else raises
:class:`NotVectorizable`, and ``make_runtime`` falls back to the sequential runtime.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedfleet.client.torch_trainer import TorchTrainer, batch_indices, check_finite_loss
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import TrainStats, Update
from fedfleet.runtime.sim.sequential import client_seed


class NotVectorizable(Exception):
    """This trainer/model cannot train a cohort with vmap; the message says why."""


class VectorizedRuntime:
    parties_in_process = True  # secure aggregation can play the parties here (secagg.in_process)

    def __init__(self, trainer: Any, federation: Any, test_data: Any = None) -> None:
        _check_supported(trainer)
        self.trainer: TorchTrainer = trainer
        self.federation = federation
        self.test_data = test_data
        self.spec = trainer.params.spec
        (self.dtype,) = self.spec.sizes
        loss = copy.copy(trainer.loss)
        loss.reduction = "none"
        model = trainer.model
        names = [e.name for e in self.spec.entries]
        sizes = [e.numel for e in self.spec.entries]
        shapes = [e.shape for e in self.spec.entries]

        def weighted_loss(flat: Tensor, xb: Tensor, yb: Tensor, wb: Tensor) -> Tensor:
            # split (not per-tensor slicing): its backward is one concatenation into the flat gradient,
            # where slices would each scatter into a full-size zero tensor
            named = {n: t.view(shape) for n, t, shape in zip(names, flat.split(sizes), shapes, strict=True)}
            per_sample = loss(functional_call(model, named, (xb,)), yb)
            squares = (per_sample.detach().square() * wb).sum()  # for Oort's utility, as the sequential trainer
            return (per_sample * wb).sum() / wb.sum().clamp_min(1.0), squares

        self._grads = vmap(grad_and_value(weighted_loss, has_aux=True))
        self._probe()

    @property
    def population(self) -> int:
        return self.federation.num_clients

    def _probe(self) -> None:
        """Fail early (and fall back) if vmap cannot batch this model."""
        fed = self.federation
        first = next(i for i in range(fed.num_clients) if len(fed.client(i).y) > 0)
        data = fed.client(first)
        flat = self.trainer.params.buffers[self.dtype].detach().unsqueeze(0)
        try:
            self.trainer.model.train()
            self._grads(flat, data.x[:1].unsqueeze(0), data.y[:1].unsqueeze(0), torch.ones(1, 1, device=flat.device))
        except Exception as exc:  # vmap raises many kinds of errors for unsupported ops
            raise NotVectorizable(f"torch.func.vmap cannot batch this model: {exc}") from exc

    def fit(self, global_params: FlatParams, clients: Sequence[int], config: FitConfig) -> Iterator[Update]:
        fed = self.federation
        g = global_params.buffers[self.dtype]
        clients = [int(c) for c in clients]
        initial = self._initial_losses(global_params, clients) if config.report_initial_loss else None
        idx, weights = self._plan(clients, config, g.device)  # (C, S, B) sample indices and 0/1 weights
        cohort, steps = idx.shape[:2]
        w = g.unsqueeze(0).repeat(cohort, 1)  # (C, P): one row per client model
        momentum = torch.zeros_like(w) if self.trainer.momentum else None
        loss_sum = torch.zeros(cohort, device=g.device)
        sq_sum = torch.zeros(cohort, device=g.device)
        self.trainer.model.train()
        for s in range(steps):
            rows, wb = idx[:, s], weights[:, s]
            grads, (losses, squares) = self._grads(w, fed.x[rows], fed.y[rows], wb)
            counts = wb.sum(1)
            loss_sum += losses.detach() * counts
            sq_sum += squares
            active = (counts > 0).to(w.dtype).unsqueeze(1)  # clients whose data ran out take no step
            if config.proximal_mu:
                grads.add_(w - g, alpha=config.proximal_mu)
            if self.trainer.weight_decay:
                grads.add_(w, alpha=self.trainer.weight_decay)
            if momentum is not None:
                momentum.copy_(torch.where(active.bool(), momentum * self.trainer.momentum + grads, momentum))
                grads = momentum
            w.sub_(grads * active, alpha=config.lr)
        w.sub_(g)  # deltas, in place
        samples = weights.sum(dim=(1, 2))
        mean_loss = (loss_sum / samples.clamp_min(1)).tolist()
        mean_sq = (sq_sum / samples.clamp_min(1)).tolist()
        for c, cid in enumerate(clients):
            check_finite_loss(mean_loss[c], config)
            metrics = {"steps": float((weights[c].sum(1) > 0).sum())}
            stats = TrainStats(
                samples=float(samples[c]),
                loss=mean_loss[c],
                loss_sq=mean_sq[c],
                initial_loss=initial[c] if initial is not None else None,
            )
            n = len(fed.client(cid).y)
            params = FlatParams(self.spec, {self.dtype: w[c]})
            update = Update(params, weight=float(n), metrics=metrics, client_id=cid, stats=stats)
            # the same context the sequential runtime gives the trainer: this client's seed for this round
            local = dataclasses.replace(config, seed=client_seed(config, cid))
            yield self.trainer.on_party(update, local, cid)

    def round_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, global_params: FlatParams) -> dict[str, float]:
        if self.test_data is None:
            return {}
        return self.trainer.evaluate(global_params, self.test_data)

    def _plan(self, clients: list[int], config: FitConfig, device: torch.device) -> tuple[Tensor, Tensor]:
        """Each client's batches, drawn with the same seeds and order as the sequential trainer."""
        offsets = self.federation.offsets
        plans = []
        for cid in clients:
            start, end = int(offsets[cid]), int(offsets[cid + 1])
            gen = torch.Generator().manual_seed(client_seed(dataclasses.replace(config), cid))
            plans.append([b + start for b in batch_indices(end - start, config, gen, torch.device("cpu"))])
        steps = max(len(p) for p in plans)
        bs = config.batch_size
        idx = torch.zeros(len(clients), steps, bs, dtype=torch.long)
        weights = torch.zeros(len(clients), steps, bs)
        for c, plan in enumerate(plans):
            for s, batch in enumerate(plan):
                idx[c, s, : len(batch)] = batch
                weights[c, s, : len(batch)] = 1.0
        return idx.to(device), weights.to(device=device, dtype=self.dtype)

    @torch.no_grad()
    def _initial_losses(self, global_params: FlatParams, clients: list[int]) -> list[float]:
        self.trainer.params.copy_(global_params)
        return [self.trainer._mean_loss(self.federation.client(c)) for c in clients]


def _check_supported(trainer: Any) -> None:
    if not isinstance(trainer, TorchTrainer):
        raise NotVectorizable(f"only TorchTrainer can be vectorised, not {type(trainer).__name__}")
    if not trainer._flat_sgd:
        raise NotVectorizable("vectorised training supports plain SGD with every trainable param exchanged")
    if len(trainer.params.spec.sizes) != 1:
        raise NotVectorizable("vectorised training needs all params in one dtype")
    if not hasattr(trainer.loss, "reduction"):
        raise NotVectorizable("vectorised training needs a loss module with a 'reduction' attribute")
    if any(True for _ in trainer.model.buffers()):
        raise NotVectorizable("the model has buffers (e.g. BatchNorm statistics) that vmap cannot update")
