"""The embedded latent-diffusion engine: models, attention, pipelines, inpainting steps.

Works on numpy arrays and tensors only; it never imports ``histosynth.integration`` or
the plugin layer. Importing this package is cheap: the names below load torch and
diffusers on first use (module ``__getattr__``).

>>> from histosynth.synthesis import load_engine
>>> engine = load_engine("tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histosynth.common.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
