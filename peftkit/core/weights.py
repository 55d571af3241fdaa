"""The one place that knows how to read and write a base layer's weight.

Every method sees a base weight in one canonical layout, `(d_out, d_in, *kernel)`:

* `nn.Linear`: `weight` as is, `(out, in)`;
* transformers' GPT-2 `Conv1D`: stores `(in, out)`, so it is transposed;
* `nn.Embedding`: `(num_embeddings, dim)` as is (a lookup table, "out" = rows);
* `nn.Conv2d`: `(out, in / groups, kh, kw)` as is;
* a normalisation layer with an affine weight (`is_norm`): its `(channels,)` weight as is (read and
  written like the others, but `layer_kind` stays None: no low-rank method targets a norm).

A quantized base (later) plugs in here by providing `peftkit_get_weight()` / `peftkit_set_weight(w)`
methods; no caller needs to know the storage format.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .fingerprint import weight_fingerprint

try:  # transformers is a dependency, but keep core importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


def plain(module: nn.Module) -> nn.Module:
    """The user's own module under the adapter layers wrapping it (named adapters stack: each wraps the last)."""
    while getattr(type(module), "wraps_base", False):
        module = module._modules["base"]
    return module


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding', 'conv2d' or None for a module no weight method supports."""
    module = plain(module)
    if hasattr(module, "peftkit_layer_kind"):
        return module.peftkit_layer_kind
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
"""torch's normalisation layers (`_NormBase` covers BatchNorm and InstanceNorm)."""


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers: torch's, and leaf modules whose class name ends in "Norm".

    Why the name: transformers' RMSNorms (LlamaRMSNorm, T5LayerNorm, Qwen2RMSNorm ...) share no base
    class, and transformers itself finds them by name (Trainer's weight-decay exclusion).
    """
    module = plain(module)
    if isinstance(module, NORM_TYPES):
        return True
    return type(module).__name__.endswith("Norm") and next(module.children(), None) is None


def is_linear(module: nn.Module) -> bool:
    """True for layers that compute `x @ W.T + b` (nn.Linear and GPT-2 Conv1D)."""
    return layer_kind(module) in ("linear", "conv1d")


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the canonical weight layout."""
    w = get_weight(module)
    return w.shape[1], w.shape[0]


def get_weight(module: nn.Module) -> torch.Tensor:
    """The base weight in canonical `(d_out, d_in, *kernel)` layout (a view where possible)."""
    module = plain(module)
    if hasattr(module, "peftkit_get_weight"):
        return module.peftkit_get_weight()
    kind = layer_kind(module)
    if kind is None and not (is_norm(module) and getattr(module, "weight", None) is not None):
        raise TypeError(f"peftkit cannot read the weight of {type(module).__name__}")
    weight = module.weight.detach()
    return weight.T if kind == "conv1d" else weight


@torch.no_grad()
def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a canonical-layout weight back into the base layer, in place (keeps the Parameter).

    Written through the Parameter itself, not `.data`, so its version counter moves: caches keyed on the
    weight's version (DoRA's ||W0|| per row) see the write."""
    module = plain(module)
    if hasattr(module, "peftkit_set_weight"):
        module.peftkit_set_weight(weight)
        return
    if layer_kind(module) == "conv1d":
        weight = weight.T
    module.weight.copy_(weight.to(module.weight.dtype))


def get_bias(module: nn.Module) -> torch.Tensor | None:
    """The base bias or None."""
    module = plain(module)
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


@torch.no_grad()
def set_bias(module: nn.Module, bias: torch.Tensor) -> None:
    """Write the bias back in place; a bias-free nn.Linear or nn.Conv2d gets a new (frozen) bias Parameter.

    Why create one: a merge that shifts the output by a constant (LoFiT's W_o v) needs a bias to fold
    into, and Llama-style layers have none. `remove_bias` takes it away again.
    """
    module = plain(module)
    if getattr(module, "bias", None) is not None:
        module.bias.data.copy_(bias.to(module.bias.dtype))
        return
    if not can_add_bias(module):
        raise TypeError(f"peftkit cannot add a bias to {type(module).__name__} (only to nn.Linear and nn.Conv2d)")
    w = module.weight
    module.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=False)


def can_add_bias(module: nn.Module) -> bool:
    """True for plain nn.Linear / nn.Conv2d layers, whose forward uses a bias once it is set."""
    module = plain(module)
    return isinstance(module, nn.Linear | nn.Conv2d) and not hasattr(module, "peftkit_get_weight")


def remove_bias(module: nn.Module) -> None:
    """Make the module bias-free again (undoes a bias that `set_bias` created)."""
    plain(module).bias = None


def weight_checksum(module: nn.Module) -> dict:
    """A cheap fingerprint of the base weight (norm and two position-weighted projections, see
    `fingerprint.py`), in its dtype and rounded to the 16-bit dtypes, so a bf16 copy still matches."""
    return weight_fingerprint(get_weight(module))
