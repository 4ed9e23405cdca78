"""A model turned into one model of a whole cohort: its layers run over stacked weights, one per client.

The cohort travels in the batch dimension: ``a`` clients' batches of ``B`` samples are ``a * B`` rows, client
after client. Every layer that holds parameters is swapped for its cohort kernel (``KERNELS``, one row per layer
type), which views its input as ``(a, B * ..., features)`` and applies client ``c``'s weights to client ``c``'s
rows: a ``bmm`` for a linear layer, one embedding lookup into the stacked tables, per-client affine maps after a
layer or group norm, convolutions per client (grouped on a GPU). Layers without parameters (activations, pooling,
flatten, reshapes in ``forward``) act on each row alone and run unchanged, so a custom ``forward`` (DLRM's) works
too. One forward and one backward then give every client's gradients: no per-client Python, no ``vmap``
batching rules, no flat-gradient concatenation.

What cannot be batched this way is refused with the reason (``NotBatchable``): a parameter-holding layer with no
kernel, buffers (BatchNorm statistics), normalisation over the batch, dropout (it draws from torch's global RNG,
which a cohort cannot share the way clients one by one do). :func:`check_rows` also runs the cohort model beside
the plain one, client by client, before training, and :func:`mixes_samples` catches a ``forward`` that mixes the
samples of a batch (no cohort path can pad such a model's short batches).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class NotBatchable(Exception):
    """The model cannot run as one cohort model; the message says which layer and why."""


Kernel = Callable[..., Tensor]  # (module, x, *stacked params in the module's order, into=grad buffers) -> output


class StepInto:
    """Plain SGD fused into the backward pass: ``target <- target - lr * grad`` in place, by the weight-gradient
    product itself (``target.baddbmm_(dout, x, alpha=-lr)``), so the gradient is never stored and the update is
    no pass of its own over the cohort's weights. ``target`` is the very tensor the forward read."""

    def __init__(self, target: Tensor, lr: float) -> None:
        self.target = target
        self.lr = lr
        self.taken = False  # set by the backward pass that took the step


FUSED_STEP: frozenset[type[nn.Module]] = frozenset({nn.Linear})  # kernels that take a StepInto for their params


class _CohortLinear(torch.autograd.Function):
    """``x @ weight[c]^T + bias[c]`` per client, in the layouts a CPU's batched GEMM runs fastest.

    Measured on the 2-core sandbox CPU (100 clients x 16 rows, 784 -> 100, one thread): the product computed as
    ``weight @ x^T`` 2.2 ms against 3.6 ms for ``x @ weight^T``; the weight gradient as ``dout^T @ x`` is
    contiguous in the weight's own layout (2.0 ms), where autograd's default gives a transposed one that made the
    optimizer's update 6x slower (14 ms against 2.5 ms). The gradients go into the caller's buffers when given
    (``into``): a fresh cohort-sized gradient each step cost 1.3 ms more of its 3.3 ms in page faults alone.
    With plain SGD the step is fused into the weight-gradient product (``StepInto``).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, into_w: Tensor | None, into_b: Tensor | None) -> Tensor:
        out = torch.bmm(weight, x.transpose(1, 2))  # (a, N, in), (a, out, in) -> (a, out, N)
        return out if bias is None else out.add_(bias.unsqueeze(2))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, into_w, into_b = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.into = (into_w, into_b)  # written, not read: outside save_for_backward's version checks

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # grad: (a, out, N)
        x, weight = ctx.saved_tensors
        into_w, into_b = ctx.into
        # the input's gradient first: a fused step below overwrites the weight it reads
        grad_x = torch.bmm(grad.transpose(1, 2), weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            if isinstance(into_w, StepInto):
                into_w.target.baddbmm_(grad, x, alpha=-into_w.lr)
                into_w.taken = True
            else:
                grad_w = torch.bmm(grad, x) if into_w is None else torch.bmm(grad, x, out=into_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            if isinstance(into_b, StepInto):
                into_b.target.sub_(grad.sum(2), alpha=into_b.lr)
                into_b.taken = True
            else:
                grad_b = grad.sum(2) if into_b is None else torch.sum(grad, 2, out=into_b)
        return grad_x, grad_w, grad_b, None, None


def _linear(m: nn.Linear, x: Tensor, weight: Tensor, bias: Tensor | None = None, into: Sequence = ()) -> Tensor:
    a = weight.shape[0]
    rows = x.reshape(a, -1, x.shape[-1])  # (a, B * ..., in)
    into_w, into_b = (*into, None, None)[:2]
    out = _CohortLinear.apply(rows, weight, bias, into_w, into_b).transpose(1, 2)  # (a, B * ..., out)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _embedding(m: nn.Embedding, ids: Tensor, weight: Tensor, into: Sequence = ()) -> Tensor:
    a, rows, dim = weight.shape
    # client c's ids index its own table: shift them by c * rows into the (a * rows, dim) stack of tables
    shift = torch.arange(a, device=ids.device).mul_(rows).view(a, *([1] * ids.dim()))
    local = ids.reshape(a, -1, *ids.shape[1:])
    out = F.embedding((local + shift).reshape(ids.shape), weight.reshape(a * rows, dim))
    if m.padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
        out = torch.where((ids == m.padding_idx).unsqueeze(-1), out.detach(), out)
    return out


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    """``x * weight[c] + bias[c]`` for client c's rows; the weights' dims sit at ``channel_dim`` onwards."""
    stacked = weight if weight is not None else bias
    a = stacked.shape[0]
    rows = x.reshape(a, -1, *x.shape[1:])
    lead = channel_dim + 1  # after (a, B) and the dims before the weights'
    tail = rows.dim() - lead - (stacked.dim() - 1)

    def shaped(t: Tensor) -> Tensor:
        return t.view(a, *([1] * (lead - 1)), *t.shape[1:], *([1] * tail))

    out = rows * shaped(weight) if weight is not None else rows
    if bias is not None:
        out = out + shaped(bias)
    return out.reshape(x.shape)


def _layer_norm(m: nn.LayerNorm, x: Tensor, *params: Tensor, into: Sequence = ()) -> Tensor:
    weight, bias = _norm_params(m, params)
    out = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _affine(out, weight, bias, x.dim() - len(m.normalized_shape))


def _group_norm(m: nn.GroupNorm, x: Tensor, *params: Tensor, into: Sequence = ()) -> Tensor:
    weight, bias = _norm_params(m, params)
    return _affine(F.group_norm(x, m.num_groups, None, None, m.eps), weight, bias, 1)


def _norm_params(m: nn.Module, params: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    names = [n for n, _ in m.named_parameters(recurse=False)]
    got = dict(zip(names, params, strict=True))
    return got.get("weight"), got.get("bias")


def _conv(
    m: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None = None, into: Sequence = ()
) -> Tensor:
    a = weight.shape[0]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 3]  # (a, out, in, *kernel)
    args = (m.stride, m.padding, m.dilation)
    if x.device.type == "cpu":
        # one convolution per client: on a CPU the grouped form below ran slower for a small first layer
        # (1 input channel: 43 ms vs 21 ms for 20 clients x 16 images); the matmul-bound layers after it
        # are batched in any case
        parts = x.reshape(a, -1, *x.shape[1:]).unbind(0)
        biases = bias.unbind(0) if bias is not None else [None] * a
        outs = [conv(p, w, b, *args, m.groups) for p, w, b in zip(parts, weight.unbind(0), biases, strict=True)]
        return torch.cat(outs)
    # a GPU: the cohort's channels side by side, one grouped convolution
    batch = x.shape[0] // a
    grouped = x.reshape(a, batch, *x.shape[1:]).transpose(0, 1).reshape(batch, a * x.shape[1], *x.shape[2:])
    flat_bias = bias.reshape(-1) if bias is not None else None
    out = conv(grouped, weight.reshape(-1, *weight.shape[2:]), flat_bias, *args, m.groups * a)
    out = out.reshape(batch, a, -1, *out.shape[2:]).transpose(0, 1)
    return out.reshape(a * batch, *out.shape[2:])


KERNELS: dict[type[nn.Module], Kernel] = {
    nn.Linear: _linear,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
}


def _refusal(m: nn.Module) -> str | None:
    """Why a layer with a kernel still cannot run over a cohort (None: it can)."""
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
        return "an nn.Embedding with max_norm or sparse gradients"
    if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
        return f"a convolution with padding_mode={m.padding_mode!r}"
    return None


class CohortLeaf(nn.Module):
    """Stands in for one parameter-holding layer; ``params`` is set to its stacked tensors before a forward."""

    def __init__(self, layer: nn.Module, kernel: Kernel, names: list[str]) -> None:
        super().__init__()
        self.layer = [layer]  # a list: not a submodule, so its own parameters stay out of this model's
        self.kernel = kernel
        self.names = names  # full names, in the layer's own parameter order
        self.params: list[Tensor] = []
        self.into: list[Tensor | None] = []  # where the params' gradients go, where the kernel can write them

    def forward(self, x: Tensor) -> Tensor:
        into, self.into = self.into, []  # a layer called twice (tied weights) gets plain gradients the second time:
        # a buffer or a fused step would be overwritten or applied before the other call's backward reads the weight
        return self.kernel(self.layer[0], x, *self.params, into=into)


class CohortModel:
    """``model`` over stacked weights: ``forward(params, x)`` with ``params[name]`` of shape ``(a, *shape)``.

    Parameters that are not in ``params`` (frozen, not exchanged) are the model's own, shared by every client.
    """

    def __init__(self, model: nn.Module) -> None:
        why = unbatchable(model)
        if why is not None:
            raise NotBatchable(why)
        self.model = copy.deepcopy(model)
        self.leaves: list[CohortLeaf] = []
        self.shared: dict[str, Tensor] = {}
        self.fusable: set[str] = set()  # params whose kernel can take a plain SGD step itself (StepInto)
        for name, module in list(self.model.named_modules()):
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            names = [f"{name}.{p}" if name else p for p, _ in own]
            leaf = CohortLeaf(module, KERNELS[type(module)], names)
            self.shared.update({n: t.detach() for n, (_, t) in zip(names, own, strict=True)})
            self.leaves.append(leaf)
            if type(module) in FUSED_STEP:
                self.fusable.update(names)
            self.model = _replace(self.model, name, leaf)

    def forward(
        self, params: dict[str, Tensor], x: Tensor, cohort: int, into: dict[str, Tensor] | None = None
    ) -> Tensor:
        """``into``: buffers ``(a, *shape)`` that kernels may write the params' gradients into (then the gradient
        autograd returns is that buffer)."""
        into = into or {}
        for leaf in self.leaves:
            leaf.params = [params[n] if n in params else _expand(self.shared[n], cohort) for n in leaf.names]
            leaf.into = [into.get(n) for n in leaf.names]
        try:
            return self.model(x)
        finally:
            for leaf in self.leaves:
                leaf.params, leaf.into = [], []

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


def unbatchable(model: nn.Module) -> str | None:
    """Why ``model`` cannot run as a cohort model (None: it can, as far as its layers tell)."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])}): state such as BatchNorm statistics is per client"
    for name, m in model.named_modules():
        label = f"layer {name or '<root>'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{label} normalises over the batch, which a cohort batch would mix"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return (
                f"{label} draws from torch's global random generator, which a cohort cannot share as clients in turn do"
            )
        if any(True for _ in m.parameters(recurse=False)):
            if type(m) not in KERNELS:
                return f"{label} holds parameters and has no cohort kernel (fedfleet.runtime.sim.cohort_layers)"
            why = _refusal(m)
            if why is not None:
                return f"{label} is {why}"
    return None


def mixes_samples(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model``'s output for a sample depends on the other samples of its batch (a batch mean, batch
    statistics): then padding a short batch, as any cohort path must, would change the result. Checked in eval
    mode, so dropout's randomness does not count as mixing (it is refused for its own reason)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    finally:
        model.train(was)
    scale = float(together.abs().max().clamp_min(1.0))
    return together.shape != alone.shape or float((together - alone).abs().max()) > 1e-4 * scale


def check_rows(cohort: CohortModel, model: nn.Module, params: dict[str, Tensor], x: Tensor) -> None:
    """The cohort model gives each client what the plain model gives it with that client's weights.

    ``params``: ``(a, *shape)`` stacked weights; ``x``: ``(a * B, ...)`` rows. Raises NotBatchable if not (a
    layer whose kernel does not fit its arguments, a ``forward`` that reads the batch's size).
    """
    a = next(iter(params.values())).shape[0]
    try:
        with torch.no_grad():
            got = cohort.forward(params, x, a).reshape(a, -1)
            want = torch.stack(
                [
                    functional_call(model, {n: t[c] for n, t in params.items()}, (part,)).reshape(-1)
                    for c, part in enumerate(x.reshape(a, -1, *x.shape[1:]).unbind(0))
                ]
            )
    except Exception as exc:  # any failure of a kernel on this model's shapes
        raise NotBatchable(f"the cohort model fails on this model's inputs: {exc}") from exc
    scale = float(want.abs().max().clamp_min(1.0))
    if got.shape != want.shape or float((got - want).abs().max()) > 1e-4 * scale:
        raise NotBatchable("the cohort model's outputs differ from the model's, client by client")


def _expand(t: Tensor, cohort: int) -> Tensor:
    return t.unsqueeze(0).expand(cohort, *t.shape)


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``root`` with its submodule ``name`` replaced by ``new`` (``new`` itself for the root)."""
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
    return root
