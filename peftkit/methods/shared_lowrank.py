"""Sibling low-rank adapters: layers that read the identical input tensor share one down projection.

In a Llama block q_proj, k_proj and v_proj receive the same tensor, and so do gate_proj and up_proj.
For such siblings i = 1..k with factors A_i (r_i, d_in), B_i (d_out_i, r_i) and scalings s_i:

    [h_1 ... h_k] = x [A_1; ...; A_k]^T                    one GEMM of width sum r_i, not k of width r_i
    y_i += s_i h_i B_i^T                                    in place, by each layer when it is called
    dL/dx  += [dh_1 ... dh_k] [A_1; ...; A_k]               one GEMM and one add into dL/dx, not k
    [dA_1; ...; dA_k] = [dh_1 ... dh_k]^T x                 one GEMM

so a Llama block runs 4 down, 4 dL/dx and 4 dL/dA products instead of 7 each. The arithmetic is the
same; what is saved is memory traffic and calls: a rank-r GEMM reads its (tokens, d_in) operand for
only r output columns, so it is bound by that read (on the benchmark CPU a (1024, 384) x (384, 16)
product takes ~170 us with x in cache and ~350 us without), and the group reads x once instead of k
times, forward and backward, and autograd adds one LoRA dL/dx into dL/dx instead of k. Measured on the
benchmark Llama (fp32, 4 x 256 tokens, LoRA r16 on all 7 linear, 1 thread, shared machine, so noisy):
the step went from 1.136x to 1.127x the floor (30 interleaved rounds), a paired median of 8-11 ms of
~920 ms per step.

Siblings are found at run time, never declared: in a training forward (grad enabled), consecutive
calls of LoRA layers with the same tensor object at the same `_version` form a group. A group starts
fusing only after a backward pass has gone through its layers' own nodes. Why that late: activation
checkpointing replays a block's forward inside backward and requires the replay to save the same
tensors as the original forward; the original ran unfused while the group was being discovered, and
by the time any of its layers' backward runs, the replay of their block has happened.

A fused call is checked, never trusted: the caller's input must be the projection's input (`x is`,
same `_version`), its factor A unchanged since (`_version`), its slice not taken yet; otherwise it
projects anew for the whole group (a new input, one changed in place, a second call with one input).
A sibling that is not called leaves its columns unused (wasted arithmetic, not a wrong result) and
its factors get no gradient, as unfused. Not fused, ever: no grad (inference),
`torch.compile` tracing (it traces the unfused kernel), active dropout (each layer draws its own
mask), mixed dtypes or autocast (`lowrank.add_low_rank`'s casting paths), a non-contiguous output.

Nothing outlives the forward's graph: a group keeps its pending projection by weak reference; the
projection (and through it the siblings' slices) is held by the first layer's autograd node, which
drops it in its backward, and each slice is released by the projection when its layer takes it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn

from .lowrank import LowRankAdd

_switch = threading.local()


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Run every low-rank layer on its own inside this block (for comparisons and when in doubt)."""
    before = getattr(_switch, "off", False)
    _switch.off = True
    try:
        yield
    finally:
        _switch.off = before


def low_rank(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y + s B A dropout(x) for a LoRA-style `layer` (factors `lora_A`, `lora_B`, `scaling`, `dropout`,
    `siblings`), through its group's shared down projection where that applies (module docstring)."""
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or getattr(_switch, "off", False)
            or not _fusable(layer, x, y)):
        return layer.low_rank(layer.dropout(x), y, layer.lora_A, layer.lora_B)
    group = layer.siblings
    if group is not None and group.active:
        h, keep = group.slice_for(layer, x)
        if h is not None:
            return SiblingUp.apply(y, h, layer.lora_B, layer.scaling, keep)
        return layer.low_rank(x, y, layer.lora_A, layer.lora_B)
    group = _discover(layer, x)
    if group is None:
        return layer.low_rank(x, y, layer.lora_A, layer.lora_B)
    return _Probe.apply(y, x, layer.lora_A, layer.lora_B, layer.scaling, group)


def _fusable(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """The plain in-place case: one dtype, no autocast, dropout inactive, a contiguous output."""
    a = layer.lora_A
    return (x.dtype == y.dtype == a.dtype and x.device == a.device and y.is_contiguous()
            and not torch.is_autocast_enabled(x.device.type) and _dropout_off(layer))


def _dropout_off(layer: nn.Module) -> bool:
    return isinstance(layer.dropout, nn.Identity) or not layer.dropout.training


class Siblings:
    """Adapter layers whose base modules receive the identical input tensor in a forward."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.active = False
        """Set by the first backward through a member's node (module docstring: why not at once)."""
        self._pending: weakref.ref[_Projection] | None = None

    def slice_for(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, _Projection | None]:
        """`layer`'s columns h = x A^T of the shared projection of `x`, computed now if `x` is new, and the
        projection itself when this call created it (the caller's node keeps it alive for the others)."""
        pending = self._pending() if self._pending is not None else None
        if pending is not None and pending.x() is x and pending.version == x._version:
            h = pending.take(layer)
            if h is not None:
                return h, None
        pending = _Projection(self, x)  # a new input, or this layer's second call with it
        self._pending = weakref.ref(pending)
        return pending.take(layer), pending

    def __getstate__(self) -> dict:  # copies and pickles: no pending projection (a weak reference)
        return {"members": self.members, "active": self.active}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])
        self.active = state["active"]


class _Projection:
    """x [A_1; ...; A_k]^T for the group's members eligible when it was made, one slice per member until
    that member takes it."""

    def __init__(self, group: Siblings, x: torch.Tensor) -> None:
        self.members = [m for m in group.members if m.enabled and not m.merged and _dropout_off(m)
                        and m.lora_A.dtype == x.dtype and m.lora_A.device == x.device]
        self.x, self.version = weakref.ref(x), x._version
        self.versions = [m.lora_A._version for m in self.members]
        self.slices: list[torch.Tensor | None] = list(SharedDown.apply(x, *(m.lora_A for m in self.members)))

    def take(self, layer: nn.Module) -> torch.Tensor | None:
        """`layer`'s slice, once; None when it has none, took it already, or its A changed since."""
        for i, member in enumerate(self.members):
            if member is layer:
                h, self.slices[i] = self.slices[i], None
                return h if h is not None and layer.lora_A._version == self.versions[i] else None
        return None


class _Run(threading.local):
    """Discovery: the latest consecutive calls that received one input tensor (weak references only)."""

    x: weakref.ref | None = None
    version = -1
    layers: list[weakref.ref] = []


_run = _Run()


def _discover(layer: nn.Module, x: torch.Tensor) -> Siblings | None:
    """Note that `layer` was called with `x`; its (new or kept) group when `x` is the previous call's input."""
    if _run.x is None or _run.x() is not x or _run.version != x._version:
        _run.x, _run.version, _run.layers = weakref.ref(x), x._version, [weakref.ref(layer)]
        return layer.siblings
    if any(ref() is layer for ref in _run.layers):
        return layer.siblings  # called twice with one input: not a sibling of itself
    _run.layers.append(weakref.ref(layer))
    members = [m for ref in _run.layers if (m := ref()) is not None]
    group = members[0].siblings
    if group is None or any(m.siblings is not group for m in members):
        group = Siblings(members)
        for m in members:
            m.siblings = group
    return group  # kept while the run stays within it: a checkpoint replay must find the same group


class _Probe(LowRankAdd):
    """`LowRankAdd` for a member of a group that does not fuse yet; its backward makes the group fuse."""

    @staticmethod
    def forward(ctx, y, x, a, b, scaling, group):
        ctx.group = group
        return LowRankAdd.forward(ctx, y, x, a, b, scaling)

    @staticmethod
    def backward(ctx, grad):
        grads = LowRankAdd.backward(ctx, grad)  # reads the saved tensors first: a checkpoint replay ran
        ctx.group.active = True
        return (*grads, None)


class SharedDown(torch.autograd.Function):
    """(h_1, ..., h_k) = column blocks of x [A_1; ...; A_k]^T; backward: one GEMM each for dL/dx and dL/dA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *factors: torch.Tensor):
        a = torch.cat(factors) if len(factors) > 1 else factors[0]  # (sum r, d_in)
        h = x.reshape(-1, x.shape[-1]) @ a.t()  # (tokens, sum r)
        ctx.save_for_backward(x, a)
        ctx.ranks = [f.shape[0] for f in factors]
        ctx.set_materialize_grads(False)
        return h.split(ctx.ranks, dim=1)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, a = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
        dh = torch.cat([x2.new_zeros(x2.shape[0], r) if g is None else g  # (tokens, sum r)
                        for g, r in zip(grads, ctx.ranks, strict=True)], dim=1)
        dx = (dh @ a).view(x.shape) if ctx.needs_input_grad[0] else None
        da = (dh.t() @ x2).split(ctx.ranks) if any(ctx.needs_input_grad[1:]) else [None] * len(ctx.ranks)
        # a member whose output got no gradient gets None, not zeros, as it would on its own
        wanted = [need and g is not None for g, need in zip(grads, ctx.needs_input_grad[1:], strict=True)]
        return dx, *(d if w else None for d, w in zip(da, wanted, strict=True))


class SiblingUp(torch.autograd.Function):
    """y + s h B^T in place, for a slice h of a `SharedDown` projection; `keep` rides along until backward."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float, keep):
        y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=scaling)  # (tokens, d_out) += s h B^T
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, b)
        ctx.scaling, ctx.keep = scaling, keep
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, b = ctx.saved_tensors
        ctx.keep = None
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, d_out)
        dh = (g2 @ b).mul_(ctx.scaling) if ctx.needs_input_grad[1] else None  # (tokens, r)
        # (h^T g)^T, as in LowRankAdd: BLAS reads the wide gradient faster untransposed
        db = (h.t() @ g2).mul_(ctx.scaling).t() if ctx.needs_input_grad[2] else None  # (d_out, r)
        return grad, dh, db, None, None
