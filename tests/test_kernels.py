"""Every fast kernel (a torch.autograd.Function under peftkit/methods) equals the plain function of its math
written next to it: the output and the gradients of the input and of every trainable tensor.

Sweep: float64 and float32 (tight), bfloat16 (loose); with and without a base bias; the base as nn.Linear
or as GPT-2 Conv1D (weight stored (d_in, d_out), output an addmm view) where the kernel runs on one;
2-D, 3-D and zero-token inputs. The kernel runs in the swept dtype; the reference runs in float64 on the
same rounded inputs, so a tolerance bounds the kernel's own rounding. A Function with no row in CASES
fails `test_every_kernel_has_a_case`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
import peftkit.methods
from peftkit.methods import (
    bone,
    bottleneck,
    diagonal_basis,
    dora,
    dsee,
    hydra,
    kronecker,
    lowrank,
    pego,
    randlora,
    spiel,
    ssf,
)

D_IN, D_OUT, R = 6, 4, 2
LEADS = [(5,), (2, 3), (0,)]
"""Leading input shapes: 2-D, 3-D, and a zero-token batch."""

TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}
"""dtype -> (rtol, atol as a share of the reference's largest entry)."""


@dataclass(frozen=True)
class Setup:
    dtype: torch.dtype
    bias: bool
    conv1d: bool
    lead: tuple[int, ...]


@dataclass(frozen=True)
class Case:
    kernel: type[torch.autograd.Function]
    build: Callable[[Setup, torch.Generator], tuple[Callable, Callable, dict, tuple[str, ...]]]
    """(setup, generator) -> (kernel_fn, reference_fn, float64 tensors by name, names of the trainable ones)."""
    bias: bool = True
    """Has a base-bias variant."""
    conv1d: bool = True
    """Runs on GPT-2 Conv1D bases."""
    zero_batch: bool = True
    """Takes a zero-token input."""


# --- the frozen base layer -------------------------------------------------------------------------
def _base(setup: Setup, g: torch.Generator, d_in: int = D_IN, d_out: int = D_OUT) -> dict:
    """x, the stored base weight w ((d_out, d_in), or (d_in, d_out) for Conv1D) and bias b0 (None without)."""
    w = torch.randn(*((d_in, d_out) if setup.conv1d else (d_out, d_in)), generator=g, dtype=torch.float64)
    return {"x": torch.randn(*setup.lead, d_in, generator=g, dtype=torch.float64), "w": w,
            "b0": torch.randn(d_out, generator=g, dtype=torch.float64) if setup.bias else None}


def _weight(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """The canonical (d_out, d_in) weight: a transposed view for Conv1D, as `core.weights.get_weight` gives."""
    return w.t() if conv1d else w


def _base_out(x: torch.Tensor, w: torch.Tensor, b0: torch.Tensor | None, conv1d: bool) -> torch.Tensor:
    """The base's output as nn.Linear or transformers' Conv1D computes it (an addmm, viewed back)."""
    if not conv1d:
        return F.linear(x, w, b0)
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w if b0 is None else torch.addmm(b0, x2, w)
    return y.view(*x.shape[:-1], w.shape[1])


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _add_case(fn, reference, **extra):
    """Builder for an in-place add kernel `fn(y, x, *factors)`: y is the base output, factors from `extra`."""
    names = list(extra)

    def build(setup, g):
        tensors = {**_base(setup, g), **{k: v(g) for k, v in extra.items()}}

        def run(f):
            def call(x, w, b0, **factors):
                return f(_base_out(x, w, b0, setup.conv1d), x, *(factors[k] for k in names))
            return call
        trainable = ("x",) + tuple(k for k in names if isinstance(tensors[k], torch.Tensor) and k not in FROZEN)
        return run(fn), run(reference), tensors, trainable
    return build


FROZEN = {"basis_a", "basis_b"}
"""Factor names that are frozen buffers (their kernels return no gradient for them)."""


def _lora(setup, g):
    tensors = {**_base(setup, g), "a": _randn(g, R, D_IN), "b": _randn(g, D_OUT, R)}

    def run(f):
        return lambda x, w, b0, a, b: f(x, w, b0, a, b, 0.7)
    return (run(lowrank.LinearLowRank.apply), run(lowrank.linear_low_rank_reference), tensors, ("x", "a", "b"))


def _bone(setup, g):
    tensors = {**_base(setup, g), "blocks": 0.3 * _randn(g, D_OUT // R, R, R)}
    trainable = ("x", "blocks") + (("b0",) if setup.bias else ())

    def run(f):
        return lambda x, w, b0, blocks: f(x, _weight(w, setup.conv1d), b0, blocks)
    return run(bone.BlockAffineLinear.apply), run(bone.block_affine_reference), tensors, trainable


def _bottleneck(series: bool, activation: str):
    def build(setup, g):
        width = D_OUT if series else D_IN
        tensors = {**_base(setup, g), "down": _randn(g, 3, width), "down_bias": _randn(g, 3),
                   "up": _randn(g, D_OUT, 3), "up_bias": _randn(g, D_OUT)}

        def run(f):
            def call(x, w, b0, down, down_bias, up, up_bias):
                y = _base_out(x, w, b0, setup.conv1d)
                return f(y, None if series else x, down, down_bias, up, up_bias, 0.6, activation)
            return call
        names = ("x", "down", "down_bias", "up", "up_bias")
        return run(bottleneck.BottleneckAdd.apply), run(bottleneck.bottleneck_reference), tensors, names
    return build


def _scale_rows(keep_direction: bool):
    def build(setup, g):
        scale = 0.5 + torch.rand(D_OUT, generator=g, dtype=torch.float64)
        if keep_direction:
            scale[1] = 0.0  # the case that keeps the direction: a zero scale cannot be divided back out
        tensors = {**_base(setup, g), "scale": scale}

        def run(f):
            return lambda x, w, b0, scale: f(_base_out(x, w, b0, setup.conv1d), scale)
        kernel = run(lambda y, s: dora.ScaleRows.apply(y, s, keep_direction))
        return kernel, run(dora.scale_rows_reference), tensors, ("x", "scale")
    return build


def _folded_dora(setup, g):
    tensors = {**_base(setup, g), "a": _randn(g, R, D_IN), "b": _randn(g, D_OUT, R),
               "scale": 0.5 + torch.rand(D_OUT, generator=g, dtype=torch.float64)}

    def run(f):
        return lambda x, w, b0, a, b, scale: f(x, w, a, b, scale, 0.7)
    return run(dora.FoldedDoRA.apply), run(dora.folded_dora_reference), tensors, ("x", "a", "b", "scale")


def _sparse_add(setup, g):
    flat = torch.randperm(D_OUT * D_IN, generator=g)[:5].sort().values
    tensors = {**_base(setup, g), "values": _randn(g, 5), "rows": flat // D_IN, "cols": flat % D_IN}

    def run(f):
        def call(x, w, b0, values, rows, cols):
            return f(_base_out(x, w, b0, setup.conv1d), x, values, rows, cols, 0.8)
        return call
    return run(dsee.SparseAdd.apply), run(dsee.sparse_add_reference), tensors, ("x", "values")


def _hydra(p: float):
    def build(setup, g):
        tensors = {**_base(setup, g), "down": _randn(g, 3, D_IN), "down_bias": _randn(g, 3),
                   "up": _randn(g, D_OUT, 3), "up_bias": _randn(g, D_OUT)}

        def run(f):
            def call(x, w, b0, down, down_bias, up, up_bias):
                y = _base_out(x, w, b0, setup.conv1d)
                torch.manual_seed(1234)  # the same dropout mask for kernel and reference
                return f(y, x, down, down_bias, up, up_bias, 0.9, p)
            return call
        names = ("x", "down", "down_bias", "up", "up_bias")
        return run(hydra.BiasedLowRankAdd.apply), run(hydra.biased_low_rank_reference), tensors, names
    return build


def _l1_of_products(setup, g):
    """X^T, Y^T (T, 2, m/n); the second rank row is small, so no product is near 0 where its sign could flip."""
    terms = int(torch.tensor(setup.lead).prod())

    def factor(width):
        magnitude = 0.5 + torch.rand(terms, 2, width, generator=g, dtype=torch.float64)
        sign = torch.randint(0, 2, (terms, 2, width), generator=g).double() * 2 - 1
        return magnitude * sign * torch.tensor([1.0, 0.1], dtype=torch.float64)[:, None]
    tensors = {"x_t": factor(3), "y_t": factor(4)}
    kernel = lambda x_t, y_t: pego.L1OfProducts.apply(x_t, y_t, x_t.new_empty(0))  # noqa: E731
    return kernel, pego.l1_of_products_reference, tensors, ("x_t", "y_t")


def _randlora(d_in: int, d_out: int):
    def build(setup, g):
        d_min, d_max = min(d_in, d_out), max(d_in, d_out)
        n = -(-d_min // R)
        tensors = {**_base(setup, g, d_in, d_out), "lam": _randn(g, R, n), "gam": _randn(g, n, d_min),
                   "u": _randn(g, d_max, n * R), "a": _randn(g, R, d_min)}
        trainable = ("x", "lam", "gam") + (("b0",) if setup.bias else ())

        def run(f):
            def call(x, w, b0, lam, gam, u, a):
                return f(x, lam, gam, b0, _weight(w, setup.conv1d), u, a, 0.5, d_in > d_out)
            return call
        return run(randlora.RandLoRAFunction.apply), run(randlora.randlora_reference), tensors, trainable
    return build


def _spiel(observed: bool):
    """SpIEL's kernel reads W0 and b0 from its layer: a real nn.Linear / Conv1D base holds them."""
    def build(setup, g):
        index = torch.randperm(D_OUT * D_IN, generator=g)[:7].sort().values
        tensors = {**_base(setup, g), "values": _randn(g, 7), "index": index}

        def kernel(x, w, b0, values, index):
            base = _conv1d(w, b0) if setup.conv1d else nn.Linear(D_IN, D_OUT, bias=b0 is not None, dtype=w.dtype)
            if not setup.conv1d:
                with torch.no_grad():
                    base.weight.copy_(w)
                    if b0 is not None:
                        base.bias.copy_(b0)
            base.requires_grad_(False)
            layer = spiel.SpIELLinear(base, density=7 / (D_OUT * D_IN))
            layer.sparse_index.copy_(index)
            if observed:  # inside a selection window the values' gradient comes from the dense dL/dW
                layer.gradient_observer = lambda dense: None
            return spiel.SparseDeltaLinear.apply(x, values, index, b0, layer)

        def reference(x, w, b0, values, index):
            return spiel.sparse_delta_reference(x, values, index, _weight(w, setup.conv1d), b0)
        return kernel, reference, tensors, ("x", "values") + (("b0",) if setup.bias else ())
    return build


def _conv1d(w: torch.Tensor, b0: torch.Tensor | None) -> nn.Module:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    base = conv1d(w.shape[1], w.shape[0]).to(w.dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(torch.zeros_like(base.bias) if b0 is None else b0)
    return base


def _scale_shift(shift: bool, channels: int = D_OUT):
    def build(setup, g):
        tensors = {**_base(setup, g), "scale": 1 + 0.2 * _randn(g, channels),
                   "shift": _randn(g, D_OUT) if shift else None}

        def run(f):
            return lambda x, w, b0, scale, shift: f(_base_out(x, w, b0, setup.conv1d), scale, shift)
        trainable = ("x", "scale") + (("shift",) if shift else ())
        return run(ssf.ScaleShift.apply), run(ssf.scale_shift_reference), tensors, trainable
    return build


CASES: dict[str, Case] = {
    "lora_add": Case(lowrank.LowRankAdd, _add_case(lowrank.LowRankAdd.apply, lowrank.low_rank_reference,
                                                   a=lambda g: _randn(g, R, D_IN), b=lambda g: _randn(g, D_OUT, R),
                                                   scaling=lambda g: 0.7)),
    "lora_linear": Case(lowrank.LinearLowRank, _lora, conv1d=False),  # a plain nn.Linear only
    "bone": Case(bone.BlockAffineLinear, _bone),
    "bottleneck_parallel_gelu": Case(bottleneck.BottleneckAdd, _bottleneck(False, "gelu")),
    "bottleneck_parallel_relu": Case(bottleneck.BottleneckAdd, _bottleneck(False, "relu")),
    "bottleneck_series_silu": Case(bottleneck.BottleneckAdd, _bottleneck(True, "silu")),
    "bottleneck_series_tanh": Case(bottleneck.BottleneckAdd, _bottleneck(True, "tanh")),
    "diagonal_basis": Case(diagonal_basis.DiagonalLowRankAdd, _add_case(
        diagonal_basis.DiagonalLowRankAdd.apply, diagonal_basis.diagonal_low_rank_reference,
        basis_a=lambda g: _randn(g, R, D_IN), basis_b=lambda g: _randn(g, D_OUT, R), e=lambda g: _randn(g, R))),
    "dora_scale_rows": Case(dora.ScaleRows, _scale_rows(False)),
    "dora_scale_rows_zero_scale": Case(dora.ScaleRows, _scale_rows(True)),
    "dora_folded": Case(dora.FoldedDoRA, _folded_dora, bias=False, conv1d=False),  # bias-free nn.Linear only
    "dsee_sparse": Case(dsee.SparseAdd, _sparse_add),
    "hydra": Case(hydra.BiasedLowRankAdd, _hydra(0.0)),
    "hydra_dropout": Case(hydra.BiasedLowRankAdd, _hydra(0.5)),
    "kronecker": Case(kronecker.KronAdd, _add_case(kronecker.KronAdd.apply, kronecker.kron_reference,
                                                   a=lambda g: _randn(g, 2, 3), b=lambda g: _randn(g, 2, 2),
                                                   scaling=lambda g: 1.3)),
    "pego_penalty": Case(pego.L1OfProducts, _l1_of_products, bias=False, conv1d=False,
                         zero_batch=False),  # no base layer, no tokens: T terms, at least one per layer
    "randlora_wide": Case(randlora.RandLoRAFunction, _randlora(D_IN, D_OUT)),
    "randlora_tall": Case(randlora.RandLoRAFunction, _randlora(D_OUT, D_IN)),
    "spiel": Case(spiel.SparseDeltaLinear, _spiel(False)),
    "spiel_selection_window": Case(spiel.SparseDeltaLinear, _spiel(True)),
    "ssf": Case(ssf.ScaleShift, _scale_shift(True)),
    "ssf_scale_only": Case(ssf.ScaleShift, _scale_shift(False)),
    "ssf_scalar_scale": Case(ssf.ScaleShift, _scale_shift(True, channels=1)),
}


def _sweep():
    for name, case in CASES.items():
        for dtype in TOLERANCES:
            for bias in (True, False) if case.bias else (False,):
                for conv1d in (False, True) if case.conv1d else (False,):
                    layout = "conv1d" if conv1d else "linear"
                    yield pytest.param(name, dtype, bias, conv1d, id=f"{name}-{str(dtype)[6:]}-bias{bias:d}-{layout}")


def _is_float(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _run(fn: Callable, tensors: dict, trainable: tuple[str, ...], dtype: torch.dtype, upstream_seed: int):
    """fn's output and the gradients of `trainable` under a fixed random upstream gradient, all in float64."""
    leaves = {k: v.to(dtype).detach().requires_grad_(k in trainable) if _is_float(v) else v
              for k, v in tensors.items()}
    out = fn(**leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, [leaves[k] for k in trainable], upstream.to(out.dtype))
    return [out.detach().double()] + [g.double() for g in grads]


@pytest.mark.parametrize(("name", "dtype", "bias", "conv1d"), list(_sweep()))
def test_kernel_equals_reference(name, dtype, bias, conv1d):
    case, (rtol, atol) = CASES[name], TOLERANCES[dtype]
    for i, lead in enumerate(LEADS if case.zero_batch else [lead for lead in LEADS if 0 not in lead]):
        g = torch.Generator().manual_seed(i)
        kernel, reference, tensors, trainable = case.build(Setup(dtype, bias, conv1d, lead), g)
        rounded = {k: v.to(dtype).double() if _is_float(v) else v for k, v in tensors.items()}
        got = _run(kernel, tensors, trainable, dtype, i)
        want = _run(reference, rounded, trainable, torch.float64, i)
        for what, a, b in zip(("output",) + tuple(f"d{k}" for k in trainable), got, want, strict=True):
            scale = float(b.abs().max()) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1e-3),
                                       msg=lambda m, what=what, lead=lead: f"{what} for input {lead}: {m}")


def _kernels_in_methods() -> set[type]:
    found = set()
    for info in pkgutil.iter_modules(peftkit.methods.__path__):
        module = importlib.import_module(f"peftkit.methods.{info.name}")
        found |= {obj for _, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, torch.autograd.Function) and obj.__module__ == module.__name__}
    return found


def test_every_kernel_has_a_case():
    missing = _kernels_in_methods() - {case.kernel for case in CASES.values()}
    assert not missing, (f"autograd.Function(s) {sorted(k.__qualname__ for k in missing)} have no entry in "
                         "tests/test_kernels.py CASES: add a plain reference function next to each and a case")


@pytest.mark.parametrize("config", [bone.BoneConfig(r=2), spiel.SpIELConfig(density=0.5), randlora.RandLoRAConfig(r=2)],
                         ids=lambda c: c.method)
def test_kernels_that_run_the_base_gemm_give_a_trained_base_bias_its_gradient(config):
    """Bone, SpIEL and RandLoRA replace the base's forward; a bias trained alongside (BitFit) still learns."""
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    peftkit.apply(model, config)
    bias = model[0].base.bias.requires_grad_(True)
    model(torch.randn(2, 3, D_IN)).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((D_OUT,), 6.0))
