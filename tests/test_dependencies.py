"""The pinned test references are installed (the README's set-up command installs them): a missing one fails
here instead of silently skipping the comparisons that need it."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PINNED = {"peft": "peft", "galore-torch": "galore_torch", "bitsandbytes": "bitsandbytes"}
"""Distribution -> module of the references the tests compare against (galore-torch imports bitsandbytes)."""


def _pins() -> dict[str, str]:
    """name -> version of the `==` pins in pyproject.toml's `test = [...]` extra (a regex: tomllib is 3.11+)."""
    extra = re.search(r"^test = \[(.*?)\]", PYPROJECT.read_text(), re.M | re.S).group(1)
    return dict(re.findall(r'"([\w-]+)==([\w.]+)"', extra))


@pytest.mark.parametrize("dist", sorted(PINNED))
def test_pinned_reference_is_installed_at_its_version(dist):
    pins = _pins()
    assert dist in pins, f"{dist} is not pinned in pyproject.toml's test extra"
    assert importlib.metadata.version(dist) == pins[dist], f"{dist} {importlib.metadata.version(dist)} != {pins[dist]}"
    importlib.import_module(PINNED[dist])
