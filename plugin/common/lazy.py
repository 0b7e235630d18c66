"""Packages that import cheaply and load their heavy names (torch, diffusers) on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``names`` (name → module)
    are imported on first access and then kept in its ``namespace`` (its ``globals()``).

    Usage in a package's ``__init__.py``::

        __getattr__, __dir__ = lazy_names(__name__, globals(), {"Engine": "pkg.engine"})
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
