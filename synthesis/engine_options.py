"""The engine's run options on its models: the attention implementation and KV compression.

``attention``: ``"sdpa"`` (PyTorch's scaled-dot-product attention, diffusers'
``AttnProcessor2_0``), ``"xformers"`` (xFormers' memory-efficient attention, CUDA only) or
``"auto"`` (xFormers when it is installed and the models are on CUDA, SDPA otherwise).
xFormers is applied to every attention layer that is *not* KV-compressed; the compressed
ones keep their own (SDPA) processor. ``kv_compress=R``: KV-compressed self-attention in
the second half of the blocks (PixArt-Σ), ``1`` turns it off.

Example:
    >>> import torch
    >>> set_models_attention([torch.nn.Linear(2, 2)], "sdpa")  # no attention layer: nothing to set
    'sdpa'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    XFormersAttnProcessor,
)
from diffusers.utils import is_xformers_available

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.kv_compression import (
    KVCompressionAttnProcessor,
    disable_kv_compression,
    enable_kv_compression,
)

__all__ = ["AttentionChoice", "set_kv_compression", "set_models_attention"]

AttentionChoice = Literal["auto", "sdpa", "xformers"]


def set_models_attention(
    models: Sequence[torch.nn.Module], attention: AttentionChoice = "auto"
) -> str:
    """Put the attention implementation ``attention`` in every attention layer of
    ``models`` (``auto`` decided on the first model's device); returns the one applied
    (``sdpa`` or ``xformers``).

    Raises:
        EngineError: ``xformers`` asked for without xFormers installed or off CUDA; an
            unknown choice.
    """
    device = next(models[0].parameters()).device
    xformers_ok = is_xformers_available() and device.type == "cuda"
    if attention == "auto":
        attention = "xformers" if xformers_ok else "sdpa"
    if attention not in ("sdpa", "xformers"):
        raise EngineError("expected attention 'auto', 'sdpa' or 'xformers'", item=str(attention))
    if attention == "xformers" and not xformers_ok:
        reason = (
            "xFormers is not installed"
            if not is_xformers_available()
            else (f"the engine runs on {device.type}, xFormers needs CUDA")
        )
        raise EngineError(
            f"cannot use xFormers attention: {reason}; use attention='sdpa' (or 'auto')",
            item="attention",
        )
    for model in models:
        for module in model.modules():
            if not isinstance(module, Attention):
                continue
            if isinstance(module.processor, KVCompressionAttnProcessor):
                continue  # compressed self-attention keeps its own processor
            module.set_processor(
                XFormersAttnProcessor() if attention == "xformers" else AttnProcessor2_0()
            )
    return attention


def set_kv_compression(model: torch.nn.Module, kv_compress: int | None) -> int | None:
    """KV-compression ratio ``kv_compress`` on a PixCell transformer (``1``: off,
    ``None``: as its weights say); returns the ratio in use (``None`` when off).

    Raises:
        EngineError: a ratio that is not an integer ≥ 1.
    """
    if kv_compress is not None:
        if int(kv_compress) != kv_compress or kv_compress < 1:
            raise EngineError(
                f"expected a KV-compression ratio >= 1 (1 = off), got {kv_compress}",
                item="kv_compress",
            )
        if kv_compress == 1:
            disable_kv_compression(model)
        else:
            enable_kv_compression(model, ratio=int(kv_compress))
    return model.config.get("kv_compress_ratio")
