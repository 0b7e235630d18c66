"""The examples in the public modules' docstrings run and print what they say.

Every module of the three layers whose docstrings hold ``>>>`` examples is collected (so a
new example is tested without being listed here); examples that need weights, slides or
files of the caller are marked ``# doctest: +SKIP`` in the docstring itself.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {
    "plugin": "histosynth",
    "synthesis": "histosynth.synthesis",
    "integration": "histosynth.integration",
}


def _modules_with_examples() -> list[str]:
    names = []
    for folder, package in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ">>>" not in path.read_text(encoding="utf-8"):
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join([package, *parts]))
    return names


MODULES = _modules_with_examples()


def test_examples_are_found() -> None:
    assert "histosynth.workflows.synthesize.workflow" in MODULES
    assert "histosynth.integration.qupath.entries" in MODULES
    assert len(MODULES) >= 10


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
