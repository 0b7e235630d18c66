"""Diffusion pipelines on the engine's models (imported lazily: diffusers is heavy).

>>> from histosynth.synthesis.pipelines import InpaintPipeline, VariationPipeline
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histosynth.common.lazy import lazy_names

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.engine import make_scheduler
    from histosynth.synthesis.pipelines.control import ControlledTransformer, MaskControl
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline, InpaintPipelineOutput
    from histosynth.synthesis.pipelines.variation import (
        VariationPipeline,
        VariationPipelineOutput,
    )

__all__ = [
    "ControlledTransformer",
    "InpaintPipeline",
    "InpaintPipelineOutput",
    "MaskControl",
    "VariationPipeline",
    "VariationPipelineOutput",
    "make_scheduler",
]

_LAZY = {
    "ControlledTransformer": "histosynth.synthesis.pipelines.control",
    "MaskControl": "histosynth.synthesis.pipelines.control",
    "InpaintPipeline": "histosynth.synthesis.pipelines.inpaint",
    "InpaintPipelineOutput": "histosynth.synthesis.pipelines.inpaint",
    "VariationPipeline": "histosynth.synthesis.pipelines.variation",
    "VariationPipelineOutput": "histosynth.synthesis.pipelines.variation",
    "make_scheduler": "histosynth.synthesis.engine",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
