"""Engine models: the PixCell denoiser and its reversible KV-compressed self-attention.

The names below are imported lazily (module ``__getattr__``), so importing a light
submodule such as ``histosynth.synthesis.models.encoders`` does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from histosynth.synthesis.models.kv_compression import (
        disable_kv_compression,
        enable_kv_compression,
        kv_compression_parameter_count,
    )
    from histosynth.synthesis.models.transformer import PixCellTransformer2DModel

__all__ = [
    "PixCellTransformer2DModel",
    "disable_kv_compression",
    "enable_kv_compression",
    "kv_compression_parameter_count",
]

_LAZY = {
    "PixCellTransformer2DModel": "histosynth.synthesis.models.transformer",
    "disable_kv_compression": "histosynth.synthesis.models.kv_compression",
    "enable_kv_compression": "histosynth.synthesis.models.kv_compression",
    "kv_compression_parameter_count": "histosynth.synthesis.models.kv_compression",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
