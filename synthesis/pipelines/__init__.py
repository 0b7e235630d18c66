"""Diffusion pipelines on the engine's models (imported lazily: diffusers is heavy).

>>> from histosynth.synthesis.pipelines import InpaintPipeline, VariationPipeline
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.engine import make_scheduler
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline, InpaintPipelineOutput
    from histosynth.synthesis.pipelines.variation import (
        VariationPipeline,
        VariationPipelineOutput,
    )

__all__ = [
    "InpaintPipeline",
    "InpaintPipelineOutput",
    "VariationPipeline",
    "VariationPipelineOutput",
    "make_scheduler",
]

_LAZY = {
    "InpaintPipeline": "histosynth.synthesis.pipelines.inpaint",
    "InpaintPipelineOutput": "histosynth.synthesis.pipelines.inpaint",
    "VariationPipeline": "histosynth.synthesis.pipelines.variation",
    "VariationPipelineOutput": "histosynth.synthesis.pipelines.variation",
    "make_scheduler": "histosynth.synthesis.engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
