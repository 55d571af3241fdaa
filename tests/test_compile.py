"""torch.compile traces every module method's adapter forward without a graph break (issue 5).

For each registered method with a builder that applies to the tiny Llama, on its first Llama row of the
contract matrix (SPT, which has none, planned on the Llama as the contract's `spt_planned` does), plus
the Llama rows named in VARIANTS, in training mode with grad and in eval mode under no_grad (inference),
unmerged: `torch.compile(fullgraph=True)` traces it into exactly one graph. On failure the message
lists `torch._dynamo.explain`'s graph count, graph_break_count and every break reason with its place.
Why fullgraph decides rather than explain's graph_break_count == 0: explain reports one graph and no
break when dynamo gives up on a frame and runs it eagerly (SpIEL's layer did: its Function's backward
could not be traced), and fullgraph costs one trace where explain-then-fullgraph would cost two.

What is compiled: one adapted layer per kind (adapter class, base class), called with the arguments it
received in an eager forward of the model, not the whole model: dynamo needs ~1 s of CPU per trace of
the whole tiny Llama and ~0.1 s per layer, which keeps the file near 30 s of CPU. In training mode the
layer's floating inputs require grad, as they do behind trained adapters, so autograd Functions are
traced together with their backward. A method whose work runs in hooks outside its layers (the soft
prompts' and prefix tuning's pre-hooks on the model) is compiled as the whole model. `wrap_top_frame`
makes dynamo trace the compiled module's own hooks; without it torch.compile runs a module's hooks as
a separate frame, which explain counts as a graph break although neither frame breaks.

Then, for LoRA, DoRA and (IA)^3, the whole model compiled with fullgraph (backend "eager") gives the
eager outputs and parameter gradients within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.layer import AdapterLayer, adapter_layers

from contract_counts import spt_planned
from test_contract import ROWS, _row_id, perturb
from tiny_models import MODELS, example_inputs, output_of

NOT_ON_LLAMA = {"vqt": "VQT adds query tokens to ViT blocks ('blocks'); the tiny Llama has none"}
"""Methods with a builder that do not apply to the tiny Llama, and why. (Selection-only methods, e.g.
BitFit, LN tuning, full fine-tuning, have no builder and no adapter forward: they are not checked.)"""

EXTRA_CONFIGS: dict[str, Callable[[], peftkit.AdapterConfig]] = {
    "spt": lambda: spt_planned("llama", budget=400),  # LoRA on 3 matrices, a sparse delta on 1
}
"""Configs of methods without a Llama row in the contract matrix."""

VARIANTS = ("p-tuning-lstm-llama",)
"""Further contract rows (by id) whose forward runs other code than their method's first row."""

XFAIL = {
    ("spiel", "train"): "SpIEL's backward builds a sparse CSR tensor for its sampled gradient (torch.compile "
    "does not support sparse tensor creation; before that, bincount has a data-dependent shape) and calls the "
    "re-selection's Python gradient observer; dynamo traces an autograd.Function's backward with its forward, "
    "so the layer runs eagerly in training (its no_grad inference forward compiles)",
    **{("p-tuning-lstm-llama", mode): "Dynamo does not support nn.LSTM (torch._dynamo.config.allow_rnn is "
       "experimental): P-tuning's LSTM prompt encoder runs eagerly (the default MLP encoder compiles)"
       for mode in ("train", "eval")},
}
"""(case, mode) pairs that keep a graph break, and why (strict: a fix fails the test until removed here)."""


def _module_methods() -> list[str]:
    """Registered methods with a builder (selection-only methods add no adapter forward to compile)."""
    return [name for name, method in peftkit.registered_methods().items() if method.build is not None]


def _llama_configs() -> dict[str, Callable[[], peftkit.AdapterConfig]]:
    """Case id -> config factory: each method's first Llama row (else EXTRA_CONFIGS), then VARIANTS."""
    first: dict[str, Callable] = {}
    for row in ROWS:
        if row.model == "llama":
            first.setdefault(row.config().method, row.config)
    configs = {m: first.get(m) or EXTRA_CONFIGS[m] for m in _module_methods() if m not in NOT_ON_LLAMA}
    return configs | {_row_id(row): row.config for row in ROWS if _row_id(row) in VARIANTS}


def _case(case: str, mode: str):
    marks = []
    if (case, mode) in XFAIL:  # the failing trace's warnings are noise
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[case, mode]), pytest.mark.filterwarnings("ignore")]
    return pytest.param(case, mode, id=f"{case}-{mode}", marks=marks)


CONFIGS = _llama_configs()
CASES = [_case(case, mode) for case in CONFIGS for mode in ("train", "eval")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on shared, busy cores two OpenMP threads make a tiny forward ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_module_method_is_checked():
    assert set(_module_methods()) == {CONFIGS[c]().method for c in CONFIGS} | set(NOT_ON_LLAMA)
    assert set(VARIANTS) <= set(CONFIGS), "a VARIANTS id names no contract row"


def _hooks_outside_layers(model: nn.Module) -> list[str]:
    """Modules outside every AdapterLayer that carry forward hooks (a method working through hooks)."""
    inside = {id(m) for layer in adapter_layers(model).values() for m in layer.modules()}
    return [name or "<model>" for name, m in model.named_modules()
            if id(m) not in inside and (m._forward_pre_hooks or m._forward_hooks)]


def _layer_calls(model: nn.Module, inputs: dict) -> dict[str, tuple[AdapterLayer, tuple, dict]]:
    """One adapted layer per kind (adapter class, base class), with the arguments it got in an eager forward."""
    kinds: dict[tuple[type, type], tuple[str, AdapterLayer]] = {}
    for name, layer in adapter_layers(model).items():
        kinds.setdefault((type(layer), type(layer.base)), (name, layer))
    calls: dict[str, tuple] = {}
    hooks = [layer.register_forward_pre_hook(lambda _, args, kwargs, name=name: calls.setdefault(name, (args, kwargs)),
                                             with_kwargs=True) for name, layer in kinds.values()]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)  # no cache: an attention layer's kwargs are then reusable
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (layer, *calls[name]) for name, layer in kinds.values()}


def _compile_targets(model: nn.Module, inputs: dict, mode: str) -> dict[str, tuple[nn.Module, tuple, dict]]:
    """What to compile: the whole model for hook-based methods, else one layer per kind with its inputs."""
    if _hooks_outside_layers(model):
        return {"<model>": (model, (), inputs)}
    targets = {}
    for name, (layer, args, kwargs) in _layer_calls(model, inputs).items():
        if mode == "train":  # a layer behind trained adapters gets inputs that require grad
            args = tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                         for a in args)
        targets[name] = (layer, args, kwargs)
    return targets


def _break_report(target: nn.Module, args: tuple, kwargs: dict) -> str:
    """Every graph break dynamo finds in `target(*args, **kwargs)`, with its reason and place."""
    explanation = torch._dynamo.explain(target)(*args, **kwargs)
    reasons = [f"{r.reason.strip()}\n    at {r.user_stack[-1] if r.user_stack else '?'}"
               for r in explanation.break_reasons]
    return (f"explain: {explanation.graph_count} graphs, graph_break_count {explanation.graph_break_count}; "
            "break reasons:\n  " + "\n  ".join(reasons or ["(none recorded)"]))


def assert_one_graph(target: nn.Module, args: tuple, kwargs: dict, what: str) -> None:
    """`target(*args, **kwargs)` compiles with fullgraph into exactly one graph; on failure, explain's break list.

    One fullgraph trace rather than explain first: explain is as slow, and it reports no break when
    dynamo gave up on a frame and ran it eagerly (SpIEL's layer: one graph, zero breaks, no reason).
    """
    graphs = []

    def record(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    try:
        torch.compile(target, fullgraph=True, backend=record)(*args, **kwargs)
    except Exception as error:  # any dynamo error is a failure; explain then says where
        torch._dynamo.reset()
        pytest.fail(f"{what}: fullgraph compile failed: {str(error).strip()[:2000]}\n"
                    f"{_break_report(target, args, kwargs)}", pytrace=False)
    finally:
        torch._dynamo.reset()
    if len(graphs) != 1:
        pytest.fail(f"{what}: {len(graphs)} graphs\n{_break_report(target, args, kwargs)}", pytrace=False)


@pytest.mark.parametrize(("case", "mode"), CASES)
def test_adapter_forward_compiles_without_graph_breaks(case, mode):
    model = MODELS["llama"](0)
    peftkit.apply(model, CONFIGS[case]())
    perturb(model)
    getattr(model, mode)()
    for name, (target, args, kwargs) in _compile_targets(model, example_inputs("llama"), mode).items():
        with torch.set_grad_enabled(mode == "train"), torch._dynamo.config.patch(wrap_top_frame=True):
            assert_one_graph(target, args, kwargs, f"{case} {mode}, {name}")


EQUALITY_METHODS = ("lora", "dora", "ia3")
"""Methods whose compiled model is compared with eager, on their contract rows (no dropout: deterministic)."""


def _output_and_grads(run: Callable, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output of `run` (the model or its compiled form) and the gradients of `model`'s trainable parameters."""
    out = output_of(run, inputs)
    weights = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)  # every logit gets its own gradient
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("method", EQUALITY_METHODS)
def test_compiled_model_matches_eager(method):
    model = MODELS["llama"](0)
    peftkit.apply(model, CONFIGS[method]())
    perturb(model)
    model.train()
    inputs = example_inputs("llama")
    eager_out, eager_grads = _output_and_grads(model, model, inputs)
    torch._dynamo.reset()
    out, grads = _output_and_grads(torch.compile(model, fullgraph=True, backend="eager"), model, inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=0)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{method}, {n}: {m}")
