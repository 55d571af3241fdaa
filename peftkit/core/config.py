"""Config base shared by every method: targets, validation and a JSON round trip.

A method's config is a flat dataclass that subclasses `AdapterConfig`, sets the class variable
`method` (its registry name) and documents each field with a docstring right under it. Those
docstrings are read at run time (`field_docs`) so that `peftkit train --help` can print them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import numbers
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


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
        try:  # the method's own checks first: their messages say what the value means ("r must be positive")
            if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
                raise ConfigError(f"layers must be non-negative integers, got {self.layers!r}")
            self.validate()
        except ConfigError:
            raise
        except Exception:  # a check that tripped over a value of the wrong type ("eight" < 1): name the field
            check_field_types(self)
            raise
        check_field_types(self)  # what the method does not check: types, 1.5 for an int, NaN or infinity

    def validate(self) -> None:
        """Raise `ConfigError` for invalid values; subclasses extend it and call super()."""

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the method name, JSON-serialisable."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from `to_dict` output; an unknown key raises and lists the valid ones.

        Numeric strings become numbers (YAML reads `1e-3` as a string); every other value must have
        its field's type (`check_field_types`), so a file with `"r": "eight"` names the field.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a mapping of field names to values, "
                              f"got {type(data).__name__} {data!r:.80}")
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


def check_field_types(cfg: AdapterConfig) -> None:
    """Check every field against its annotation (int, float, bool, str, list[...], dict[...], X | None).

    Why here, for every config: values come from JSON, YAML and peft's adapter_config.json as well as
    from Python, and a wrong type would otherwise surface as a TypeError deep inside a method. Integers
    are accepted for float fields; a float (even 8.0) for an int field, a bool for a number and NaN or
    infinity anywhere are refused. Values are normalised in place (tuples become lists, numpy numbers
    plain int/float) so that `to_dict` stays JSON.
    """
    hints = _type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.name in hints:
            setattr(cfg, f.name, check_value(getattr(cfg, f.name), hints[f.name], f"{type(cfg).__name__}.{f.name}"))


def check_fields(obj: Any, name: str, lenient: bool = False) -> list[str]:
    """Check every annotated field of dataclass instance `obj` in place; returns the errors (as `name.field`).

    `lenient` first reads each value as `lenient_number` does, for configs that people type (YAML, flags).
    """
    hints, errors = _type_hints(type(obj)), []
    for f in dataclasses.fields(obj):
        if f.name not in hints:
            continue
        value = getattr(obj, f.name)
        value = lenient_number(value, hints[f.name]) if lenient else value
        try:
            setattr(obj, f.name, check_value(value, hints[f.name], f"{name}.{f.name}"))
        except ConfigError as err:
            errors.append(str(err))
    return errors


def lenient_number(value: Any, hint: Any) -> Any:
    """A typed value as the number the user meant, for a field whose type is a number; lossless only.

    YAML 1.1 reads `1e-3` and `1e3` (exponents without a dot) as text, and people write `max_steps: 1e3` or
    `batch_size: 4.0`: numeric strings become numbers and whole floats become ints for int-only fields.
    `1.5` for an int stays 1.5, for `check_value` to refuse.
    """
    arms = set(typing.get_args(hint) or (hint,)) - {type(None)}
    if not arms or not arms <= {int, float}:
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if arms == {int} and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved is not checked
        return {}


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to `hint`'s plain form, or a ConfigError naming `where` and the expected type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _finite_everywhere(value, where)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(value, option, where)
            except ConfigError as err:
                last = err
        if len(args) - (type(None) in args) == 1:
            raise last
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")
    if origin is list or hint is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")
        return [check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r:.80}")
        key, item = args or (Any, Any)
        return {check_value(k, key, f"{where} key"): check_value(v, item, f"{where}[{k!r}]") for k, v in value.items()}
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is bool and not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{where} must be true or false, got {value!r:.80}")
    if hint is bool:
        return bool(value)
    if hint in (int, float) and (isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real)):
        raise ConfigError(f"{where} must be a number ({hint.__name__}), got {value!r:.80}")
    if hint is float:
        return _finite(float(value), where)
    if hint is int:
        if not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r:.80}")
    return value


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def _finite_everywhere(value: Any, where: str) -> Any:
    """Refuse NaN/infinity inside an untyped (Any) value, at any depth."""
    if isinstance(value, float):
        _finite(value, where)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _finite_everywhere(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite_everywhere(v, f"{where}[{k!r}]")
    return value


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


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
