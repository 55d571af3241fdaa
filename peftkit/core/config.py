"""Config base shared by every method: targets, validation and a JSON round trip.

A method's config is a flat dataclass that subclasses `AdapterConfig`, sets the class variable
`method` (its registry name) and documents each field with a docstring right under it. Those
docstrings are read at run time (`field_docs`) so that `peftkit train --help` can print them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is expected."""


@dataclass
class AdapterConfig:
    """Fields every method understands. Subclasses add their own, flat, each with a docstring."""

    method: ClassVar[str] = ""
    """Registry name of the method; set by each subclass."""

    paper: ClassVar[str] = ""
    """Citation (authors, year, arXiv id) shown in the method table."""

    trainable: ClassVar[str] = ""
    """Closed-form trainable-parameter count, shown in the method table."""

    trains_head: ClassVar[bool] = False
    """True when the method itself trains or replaces the model's output head (full fine-tuning,
    head-only, VQT's new head); `peftkit train` otherwise adds a fresh classifier head to
    `modules_to_save`, since a random head cannot stay frozen."""

    targets: str | list[str] | None = None
    """Modules to adapt: names or dotted suffixes ("q_proj", "attn.c_attn"), regexes written
    "re:<pattern>" (matched against the full module name), or "all-linear" (every linear layer
    except the output head)."""

    exclude: list[str] = field(default_factory=list)
    """Modules never adapted, in the same syntax as `targets`."""

    layers: list[int] | None = None
    """Only adapt modules inside these blocks: the first integer in a module's dotted name."""

    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully and saved with the adapter (for example a fresh classifier head)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        for name in ("exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative integers, got {self.layers!r}")
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` for invalid values; subclasses extend it and call super()."""

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the method name, JSON-serialisable."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from `to_dict` output; an unknown key raises and lists the valid ones."""
        data = {k: v for k, v in data.items() if k != "method"}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(valid)}"
            )
        return cls(**coerce_numbers(cls, data))

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def coerce_numbers(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Turn numeric strings into numbers for float/int fields (YAML reads `1e-3` as a string)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(data)
    for key, value in data.items():
        kind = types.get(key, "")
        if isinstance(value, str) and kind.split(" | ")[0] in ("float", "int"):
            try:
                out[key] = float(value) if kind.startswith("float") else int(value)
            except ValueError as err:
                raise ConfigError(f"{cls.__name__}.{key} must be a number, got {value!r}") from err
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field of `cls` (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "builtins":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:], strict=False):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and is_doc:
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    names = [f.name for f in dataclasses.fields(cls)]
    return {name: docs.get(name, "") for name in names}
