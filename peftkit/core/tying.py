"""Tied weights: base tensors that another module of the model reads too.

A model with `tie_word_embeddings=True` (SmolLM2, GPT-2, Gemma ...) holds ONE Parameter as both the
input embedding and the output head. Writing into it (a merge, PiSSA's residual) changes both modules,
while the adapter was meant for one: merged != unmerged. peftkit therefore finds shared tensors before
any base write, for every method at once, and gives the written module its own copy (`AdapterLayer.untie`),
saying so; the shared Parameter itself is never written, so putting it back restores the tie exactly.

Sharing is by memory, not by name: the same Parameter object, or views whose bytes overlap in one
storage (views into one flat buffer that do not overlap, as under FSDP, are not shared).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of the memory a tensor can touch."""
    size = t.element_size()
    start = t.storage_offset() * size
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    return t.untyped_storage().data_ptr(), start, start + span * size


class SharedTensors:
    """Every parameter of a model by the memory it occupies, to ask which other modules read a tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.by_storage: dict[int, list[tuple[int, int, nn.Module, str]]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for local, p in module._parameters.items():
                if p is not None and not p.is_meta and p.numel():
                    ptr, start, end = _extent(p)
                    full = f"{module_name}.{local}" if module_name else local
                    self.by_storage.setdefault(ptr, []).append((start, end, module, full))

    def outside(self, module: nn.Module, scope: nn.Module) -> dict[str, list[str]]:
        """{name of a parameter of `module` itself: names of the parameters outside `scope` sharing its memory}."""
        inside = {id(m) for m in scope.modules()}
        shared: dict[str, list[str]] = {}
        for local, p in module._parameters.items():
            if p is None or p.is_meta or not p.numel():
                continue
            ptr, start, end = _extent(p)
            others = sorted({full for o_start, o_end, owner, full in self.by_storage.get(ptr, [])
                             if id(owner) not in inside and o_start < end and start < o_end})
            if others:
                shared[local] = others
        return shared


def warn_untied(module_name: str, shared: dict[str, list[str]], why: str) -> None:
    """Say which tie was broken and why (a merged or base-rewriting layer got its own copy)."""
    pairs = "; ".join(f"{module_name}.{local} with {', '.join(others)}" for local, others in shared.items())
    warnings.warn(f"tied weights: {pairs} share one tensor; {why}, {module_name} gets its own copy so the "
                  "other module keeps its weights (the tie is restored when the adapter is unmerged or unloaded "
                  "unmerged)", stacklevel=3)


def settle_config(model: nn.Module, untied: list[str]) -> None:
    """After `unload` left merged layers untied: keep a transformers config from tying them again on reload.

    Only when the broken tie is the input/output embedding tie (`tie_word_embeddings`), and only when the
    two embeddings now really are separate tensors: the flag then describes the model as it is, so
    `save_pretrained` writes both matrices and `from_pretrained` keeps them apart.
    """
    config = getattr(model, "config", None)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inputs = get_in() if callable(get_in) else None
    outputs = get_out() if callable(get_out) else None
    if not (config is not None and getattr(config, "tie_word_embeddings", False) and inputs is not None
            and outputs is not None and getattr(inputs, "weight", None) is not getattr(outputs, "weight", None)):
        return
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config and getattr(text, "tie_word_embeddings", False):
        text.tie_word_embeddings = False
    warnings.warn(f"the merged model keeps {', '.join(untied)} apart from the weights they were tied to; "
                  "its config now says tie_word_embeddings=False so that save_pretrained/from_pretrained "
                  "keep them apart too", stacklevel=3)
