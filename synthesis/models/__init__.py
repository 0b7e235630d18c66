"""Engine models: the PixCell denoiser and its reversible KV-compressed self-attention."""

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
