"""Dependencies point down only (architecture.md): a lower layer never imports a higher one."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "peftkit"
# lower index = lower layer; a module may import its own layer and the ones below it
LAYERS = ["core", "quant", "methods", "schedules", "optim", "merging", "serve", "search", "federated", "train", "transfer",
          "cli"]


def _layer(path: pathlib.Path) -> str | None:
    rel = path.relative_to(PACKAGE).parts
    name = rel[0].removesuffix(".py")
    return name if name in LAYERS else None


def _imported_layers(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    depth = len(path.relative_to(PACKAGE).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package root
                parts = list(path.relative_to(PACKAGE).parts[:-1])[: max(depth - node.level + 1, 0)]
                target = parts + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("peftkit."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("peftkit.")}
    return {f for f in found if f in LAYERS}


def test_no_import_points_up():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(path)
        if layer is None:
            continue
        for imported in _imported_layers(path):
            if LAYERS.index(imported) > LAYERS.index(layer):
                violations.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {imported}")
    assert not violations, violations


def test_core_knows_no_method():
    for path in (PACKAGE / "core").rglob("*.py"):
        text = path.read_text()
        for word in ("lora", "dora", "ia3", "prompt"):
            assert f"methods.{word}" not in text, f"{path.name} imports a method"
