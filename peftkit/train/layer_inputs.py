"""Unlabelled inputs of chosen layers, for DAREx-q's data-free rescale (`peftkit.merging.combine(q="data-free")`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def collect_layer_inputs(model: nn.Module, batches: Iterable, names: Iterable[str],
                         max_rows: int = 2048) -> dict[str, torch.Tensor]:
    """{module name: X (n, d_in)}: the inputs each named module sees on a few batches, rows of all tokens.

    Forward pre-hooks on the modules, removed afterwards; the model runs under `torch.no_grad` and is
    otherwise untouched. A batch is passed as `model(**batch)` when it is a dict, else `model(batch)`.
    At most `max_rows` rows are kept per module (the first ones); padding positions are included.

    Args:
        model: the base model (or the adapted one: an adapter layer sees the same input).
        batches: an iterable of batches; a handful is enough for one scalar per layer.
        names: module names as the adapter's tensors have them (`model.layers.0.self_attn.q_proj`).
    """
    modules = dict(model.named_modules())
    names = list(names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no module named {missing[0]!r} in this model ({len(missing)} missing); pass the adapter's "
                       "module names (its tensor keys without .lora_A/.lora_B)")
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name: str):
        def hook(_module, args):
            have = sum(len(r) for r in rows[name])
            if have < max_rows:
                x = args[0].detach()
                rows[name].append(x.reshape(-1, x.shape[-1])[: max_rows - have].float().cpu())
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    empty = [n for n, r in rows.items() if not r]
    if empty:
        raise ValueError(f"module {empty[0]!r} saw no input on these batches; is it used by the forward?")
    return {n: torch.cat(r) for n, r in rows.items()}
