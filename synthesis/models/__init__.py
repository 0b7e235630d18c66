"""Engine models: the PixCell denoiser, its reversible KV-compressed self-attention and
its vessel-mask ControlNet.

The names below are imported lazily (module ``__getattr__``), so importing a light
submodule such as ``histosynth.synthesis.models.encoders`` does not import diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histosynth.common.lazy import lazy_names

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from histosynth.synthesis.models.controlnet import PixCellControlNet
    from histosynth.synthesis.models.kv_compression import (
        disable_kv_compression,
        enable_kv_compression,
        kv_compression_parameter_count,
    )
    from histosynth.synthesis.models.transformer import PixCellTransformer2DModel

__all__ = [
    "PixCellControlNet",
    "PixCellTransformer2DModel",
    "disable_kv_compression",
    "enable_kv_compression",
    "kv_compression_parameter_count",
]

_LAZY = {
    "PixCellControlNet": "histosynth.synthesis.models.controlnet",
    "PixCellTransformer2DModel": "histosynth.synthesis.models.transformer",
    "disable_kv_compression": "histosynth.synthesis.models.kv_compression",
    "enable_kv_compression": "histosynth.synthesis.models.kv_compression",
    "kv_compression_parameter_count": "histosynth.synthesis.models.kv_compression",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
