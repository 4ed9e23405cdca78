"""A plain PyTorch trainer: your ``nn.Module``, a loss, and data as tensors.

One instance serves every simulated client: the model's exchanged params are views into a flat buffer
(:func:`bind_module`), so loading the global model is one copy, plain SGD is one fused op per dtype on the
flat grad buffer, and the delta is one subtraction into a reused buffer.

The default loss and the evaluation metrics follow the model's output (``client.tasks``): class logits get
cross-entropy and accuracy, one logit gets BCE, AUC and log loss. Params named in ``keep_local`` are
never exchanged and stay with each client across rounds (``client.local_params``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from fedfleet.client.local_params import LocalParams, match_local
from fedfleet.client.tasks import METRICS, OutputLoss, output_kind
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams, Selector, bind_grads, bind_module, select_params
from fedfleet.core.pipeline import Pipeline, TransformContext, UpdateTransform
from fedfleet.core.update import TrainStats, Update
from fedfleet.errors import ConfigError, TrainingDivergedError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


class TorchTrainer:
    """Local training of ``model`` with ``loss`` on a party's ``(x, y)`` tensors.

    ``optimizer``: a name in ``OPTIMIZERS``; it is created afresh for each ``fit`` (clients of a
    simulation do not share optimizer state). Plain SGD (with momentum / weight decay) runs on the flat
    buffers directly when every trainable parameter is exchanged.

    ``keep_local``: regular expressions searched in parameter names (``embeddings\\.user_id``); those params
    are left out of ``exchange`` and kept per client (by ``data.client_id``) across rounds.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        exchange: Selector = "all",
        keep_local: Sequence[str] = (),
        device: str | torch.device = "cpu",
        data: Any = None,
        eval_batch_size: int = 1024,
        update_transforms: Sequence[UpdateTransform] = (),
    ) -> None:
        """``update_transforms``: the party-side chain of the aggregation pipeline (``core.pipeline``), applied
        to every update before ``fit`` returns it (clipping, noise, ...)."""
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if momentum < 0 or weight_decay < 0:
            raise ConfigError("momentum and weight_decay must be >= 0")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss = loss if loss is not None else OutputLoss()
        self._per_sample_loss = _unreduced(self.loss)
        self.optimizer = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.data = data
        self.eval_batch_size = eval_batch_size
        self.keep_local = tuple(keep_local)
        self.pipeline = Pipeline(client=tuple(update_transforms))
        self.local: LocalParams | None = None
        if self.keep_local:
            named = list(self.model.named_parameters())
            local = set(match_local(named, self.keep_local))
            shared = {n for n, _ in select_params(self.model, exchange)} - local
            if not shared:
                raise ConfigError("client.keep_local matches every exchanged parameter: nothing would be shared")
            self.local = LocalParams([(n, p) for n, p in named if n in local])
            exchange = _Named(frozenset(shared))
        self.params = bind_module(self.model, exchange)
        self.grads = bind_grads(self.model, self.params)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self._flat_sgd = optimizer == "sgd" and trainable <= set(self.params.spec.names)
        self._delta = self.params.zeros_like()

    # -- Trainer protocol ---------------------------------------------------------------------
    def fit(self, params: FlatParams, config: FitConfig, data: Any = None) -> Update:
        data = self._data(data)
        n = len(data.y)
        if n == 0:
            raise ValueError("cannot train on a client with no examples")
        self.params.copy_(params)  # load the global model: one copy per dtype
        if self.local is None:
            metrics, stats = self._train(params, config, data)
        else:
            client = getattr(data, "client_id", None)  # None: a deployed party, the only client it knows
            self.local.load(client)
            try:
                metrics, stats = self._train(params, config, data)
            finally:  # even after an error: the next client must not inherit these rows
                kept = self.local.store(client)
            metrics["local_rows"] = float(kept)
        for d, buf in self._delta.buffers.items():
            torch.sub(self.params.buffers[d], params.buffers[d], out=buf)
        update = Update(self._delta, weight=float(n), metrics=metrics, stats=stats)
        return self.on_party(update, config, getattr(data, "client_id", -1))

    def on_party(self, update: Update, config: FitConfig, client: int | str) -> Update:
        """The party-side transforms, with the round's context (a no-op without any)."""
        if not self.pipeline.client:
            return update
        return self.pipeline.on_party(update, TransformContext(config.round, client, config.seed))

    def _train(self, params: FlatParams, config: FitConfig, data: Any) -> tuple[dict[str, float], TrainStats]:
        """Local training from ``params``; the metrics shown and the typed stats the server uses."""
        initial = self._mean_loss(data) if config.report_initial_loss else None
        self.model.train()
        step = self._make_step(params, config)
        gen = torch.Generator().manual_seed(config.seed)
        total_loss = torch.zeros((), device=self.device)
        total_sq = torch.zeros((), device=self.device)  # sum of squared per-sample losses (Oort's utility)
        steps = 0
        samples = 0
        for xb, yb in iterate_batches(data, config, gen):
            self.grads.zero_()
            out = self.model(xb)
            loss = self.loss(out, yb)
            loss.backward()
            step()
            total_loss += loss.detach() * len(yb)
            if self._per_sample_loss is not None:
                with torch.no_grad():  # from the same outputs: the loss the model trained on is untouched
                    total_sq += self._per_sample_loss(out.detach(), yb).square().sum()
            samples += len(yb)
            steps += 1
        n = max(samples, 1)
        mean_loss = float(total_loss) / n  # one sync per fit, not per step
        check_finite_loss(mean_loss, config)
        loss_sq = float(total_sq) / n if self._per_sample_loss is not None else None
        stats = TrainStats(samples=float(samples), loss=mean_loss, loss_sq=loss_sq, initial_loss=initial)
        return {"steps": float(steps)}, stats

    @torch.no_grad()
    def evaluate(self, params: FlatParams, data: Any = None) -> dict[str, float]:
        data = self._data(data)
        self.params.copy_(params)
        self.model.eval()
        # a client's own local rows for its data; every client's for a central test set (personalised model)
        local = self.local.applied(getattr(data, "client_id", None)) if self.local is not None else nullcontext()
        loss_sum, count, metric = 0.0, 0, None
        with local:
            for start in range(0, len(data.y), self.eval_batch_size):
                xb = data.x[start : start + self.eval_batch_size]
                yb = data.y[start : start + self.eval_batch_size]
                out = self.model(xb)
                loss_sum += float(self.loss(out, yb)) * len(yb)
                if metric is None:  # which metrics: the output's kind (class logits, one logit, other)
                    metric = METRICS[output_kind(out, yb)]()
                metric.update(out, yb)
                count += len(yb)
        metrics = {"loss": loss_sum / max(count, 1), "examples": float(count)}
        if metric is not None:
            metrics.update(metric.result())
        return metrics

    # -- internals ----------------------------------------------------------------------------
    def _data(self, data: Any) -> Any:
        data = data if data is not None else self.data
        if data is None:
            raise ValueError("no data: pass data= to the trainer or to fit()/evaluate()")
        return data

    @torch.no_grad()
    def _mean_loss(self, data: Any) -> float:
        self.model.eval()
        total = 0.0
        for start in range(0, len(data.y), self.eval_batch_size):
            xb, yb = data.x[start : start + self.eval_batch_size], data.y[start : start + self.eval_batch_size]
            total += float(self.loss(self.model(xb), yb)) * len(yb)
        return total / len(data.y)

    def _make_step(self, global_params: FlatParams, config: FitConfig) -> Callable[[], None]:
        """The optimizer step for one fit, with FedProx's proximal gradient mu * (w - w_global) folded in."""
        mu = config.proximal_mu
        pairs = [(self.params.buffers[d], self.grads.buffers[d], global_params.buffers[d]) for d in self.params.buffers]

        def add_proximal() -> None:
            for w, g, w0 in pairs:
                g.add_(w - w0, alpha=mu)

        if self._flat_sgd:
            lr, wd, beta = config.lr, self.weight_decay, self.momentum
            moms = [torch.zeros_like(w) for w, _, _ in pairs] if beta else []

            @torch.no_grad()
            def flat_step() -> None:
                if mu:
                    add_proximal()
                for i, (w, g, _) in enumerate(pairs):
                    if wd:
                        g.add_(w, alpha=wd)
                    if beta:
                        g = moms[i].mul_(beta).add_(g)
                    w.add_(g, alpha=-lr)

            return flat_step

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        kwargs: dict[str, float] = {"lr": config.lr, "weight_decay": self.weight_decay}
        if self.optimizer in ("sgd", "rmsprop"):
            kwargs["momentum"] = self.momentum
        opt = OPTIMIZERS[self.optimizer](trainable, **kwargs)

        def torch_step() -> None:
            if mu:
                with torch.no_grad():
                    add_proximal()
            opt.step()
            for p in trainable:  # params outside the flat buffer keep ordinary grads
                if p.grad is not None and not _is_view_of(p.grad, self.grads):
                    p.grad = None

        return torch_step


class _Named:
    """Selects params by name (picklable, unlike a lambda: trainers are shipped to Ray workers)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def __call__(self, name: str, param: nn.Parameter) -> bool:
        return name in self.names


def check_finite_loss(mean_loss: float, config: FitConfig) -> None:
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(
            f"the local loss became {mean_loss} in round {config.round + 1} (client.lr={config.lr}): training "
            f"diverged; lower the learning rate (client.lr) or check the data for NaN/inf values"
        )


def _is_view_of(t: Tensor, flat: FlatParams) -> bool:
    return any(t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b in flat.buffers.values())


def iterate_batches(data: Any, config: FitConfig, gen: torch.Generator):
    """Shuffled mini-batches: ``epochs`` passes, or exactly ``steps`` batches when ``steps`` is set.

    The permutation comes from ``gen`` alone, so the cohort-vectorised runtime can reproduce it exactly.
    """
    for idx in batch_indices(len(data.y), config, gen, data.y.device):
        yield data.x[idx], data.y[idx]


def batch_indices(n: int, config: FitConfig, gen: torch.Generator, device: torch.device):
    """Index tensors of the shuffled batches. ``gen`` is a CPU generator so every device draws the same order."""
    bs = config.batch_size
    left = config.steps if config.steps is not None else config.epochs * -(-n // bs)
    while left > 0:
        perm = torch.randperm(n, generator=gen).to(device, non_blocking=True)
        for start in range(0, n, bs):
            if left == 0:
                return
            left -= 1
            yield perm[start : start + bs]


def _unreduced(loss: Any) -> Any:
    """A per-sample twin of a loss module with ``reduction`` (None for a plain function): Oort ranks clients by
    the root mean square of their samples' losses, which the mean loss alone cannot give."""
    if getattr(loss, "reduction", None) not in ("mean", "sum"):
        return None
    twin = copy.copy(loss)
    twin.reduction = "none"
    return twin
