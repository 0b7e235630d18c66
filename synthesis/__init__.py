"""The embedded latent-diffusion engine: models, attention, pipelines, inpainting steps.

Works on numpy arrays and tensors only; it never imports ``histosynth.integration`` or
the plugin layer. Importing this package is cheap: the names below load torch and
diffusers on first use (module ``__getattr__``).

>>> from histosynth.synthesis import load_engine
>>> engine = load_engine("tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.engine import Engine, load_engine
    from histosynth.synthesis.errors import EngineError
    from histosynth.synthesis.model_report import (
        check_preset,
        describe_preset,
        format_models_report,
    )

__all__ = [
    "Engine",
    "EngineError",
    "check_preset",
    "describe_preset",
    "format_models_report",
    "load_engine",
]

_LAZY = {
    "Engine": "histosynth.synthesis.engine",
    "check_preset": "histosynth.synthesis.model_report",
    "describe_preset": "histosynth.synthesis.model_report",
    "format_models_report": "histosynth.synthesis.model_report",
    "load_engine": "histosynth.synthesis.engine",
    "EngineError": "histosynth.synthesis.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
