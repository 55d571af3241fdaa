"""Which parameters train, how many there are, and a summary table."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .adapters import STATE_ATTR
from .config import ConfigError
from .inject import HEAD_NAMES, matches, plain_modules
from .layer import AdapterLayer


@dataclass(frozen=True)
class TrainableCount:
    """Trainable and total parameter counts of a model."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable fraction of all parameters."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({100 * self.share:.4f}%)"


def trainable_parameters(model: nn.Module) -> TrainableCount:
    """Count trainable parameters (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return TrainableCount(trainable, total)


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups of the model's trainable parameters: one per learning rate.

    Every parameter trains with `lr` unless its adapter's `ModelAdapter.learning_rates(lr)` names another
    one (DePT's prompt and embedding update). A method that asks for nothing gives one group, the
    same as passing the trainable parameters themselves. peftkit's training loop uses this; in a
    plain loop: `torch.optim.AdamW(param_groups(model, lr=1e-3))`.
    """
    rates: dict[int, float] = {}
    found = getattr(model, STATE_ATTR, None)
    for state in (found.states.values() if found is not None else ()):
        if state.model_adapter is not None:
            rates.update({id(p): value for p, value in state.model_adapter.learning_rates(lr).items()})
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups.setdefault(rates.get(id(p), lr), []).append(p)
    return [{"params": params, "lr": rate} for rate, params in groups.items()]


def freeze(model: nn.Module) -> None:
    """Turn off gradients for every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)


def parameters_of_modules(model: nn.Module, patterns: list[str], strict: bool = False) -> list[str]:
    """Names of all parameters inside modules matching any pattern (target syntax).

    `strict`: raise a ConfigError, listing the model's modules, when a pattern matches no module that
    holds parameters (`modules_to_save` in a config the user wrote: a typo would leave a fresh head frozen).
    """
    names = []
    hits = dict.fromkeys(patterns, False)
    for module_name, module in model.named_modules():
        matched = [p for p in patterns if module_name and matches(module_name, p)]
        own = [f"{module_name}.{n}" for n, _ in module.named_parameters()] if matched else []
        names += own
        hits.update(dict.fromkeys(matched if own else [], True))
    missing = [p for p, hit in hits.items() if not hit]
    if strict and missing:
        raise ConfigError(f"modules_to_save {missing} matched no module with parameters; modules in this model: "
                          f"{', '.join(_module_names(model))}. Use one of these names (or 're:<regex>')")
    return sorted(set(names))


def _module_names(model: nn.Module, limit: int = 40) -> list[str]:
    """Unique last components of the names of modules holding parameters, heads first, for error messages."""
    seen: dict[str, None] = {}
    for name, module in plain_modules(model):  # the model's own modules, not what adapters added
        last = name.split(".")[-1]
        if name and not last.isdigit() and next(module.parameters(), None) is not None:
            seen.setdefault(last, None)
    heads = [n for n in seen if n in HEAD_NAMES]
    names = heads + [n for n in seen if n not in HEAD_NAMES]
    return names[:limit] + (["..."] if len(names) > limit else [])


def summary_rows(model: nn.Module) -> list[tuple[str, str, int]]:
    """(module, kind, trainable parameters) for every module that holds trainable parameters."""
    rows = []
    named = len(getattr(getattr(model, "peftkit_state", None), "states", {})) > 1  # say which adapter
    for name, module in model.named_modules():
        own = [p for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if isinstance(module, AdapterLayer):
            own = [p for p in module.adapter_parameters().values() if p.requires_grad]
            kind = type(module).__name__ + (f" [{module.adapter_name}]" if named else "")
            while name.endswith(".base") and isinstance(model.get_submodule(name[:-5]), AdapterLayer):
                name = name[:-5]  # a stacked adapter's layer, shown under its module's own name
        else:
            if any(n.startswith("base.") for n, _ in module.named_parameters()):
                continue  # counted by the enclosing AdapterLayer
            kind = "trained " + type(module).__name__
        if own:
            rows.append((name or "<model>", kind, sum(p.numel() for p in own)))
    return rows


def print_summary(model: nn.Module, max_rows: int = 30) -> str:
    """Print (and return) a table of adapted modules, trainable counts and the trainable share."""
    rows = summary_rows(model)
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{width}}  {'kind':<22}  {'trainable':>12}", "-" * (width + 38)]
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 1]
    lines += [f"{n:<{width}}  {k:<22}  {c:>12,}" for n, k, c in shown]
    if len(rows) > len(shown):
        rest = rows[len(shown) :]
        lines.append(f"{'... ' + str(len(rest)) + ' more':<{width}}  {'':<22}  {sum(r[2] for r in rest):>12,}")
    lines += ["-" * (width + 38), str(trainable_parameters(model))]
    text = "\n".join(lines)
    print(text)
    return text
