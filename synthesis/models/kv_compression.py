"""KV-compressed self-attention for PixArt-style DiTs (PixArt-Σ), as a diffusers processor.

``Attn(Q, K, V) = softmax(Q f_R(K)ᵀ / √d) f_R(V)`` where ``f_R`` is a depthwise
``Conv2d(C, C, kernel=R, stride=R, groups=C)`` over the token grid, initialised to average
pooling (weights 1/R², bias 0), optionally followed by ``LayerNorm(C)``; one conv (+norm)
per block, shared by K and V, applied to the *projected* keys and values, as in PixArt-Σ's
``AttentionKVCompress`` (``sampling='conv'``). Queries keep all N tokens; keys/values shrink
to ⌊h/R⌋·⌊w/R⌋ (a grid side that is not a multiple of R drops its last row/column, as
PixArt-Σ's strided conv does). Only ``attn1`` (self-attention) is touched; cross-attention
to the UNI condition is never compressed.

The processor is an ``nn.Module`` owned by its ``Attention`` layer, so ``state_dict``,
``save_pretrained`` / ``from_pretrained``, ``.to()`` and optimisers see the conv and norm
(keys ``transformer_blocks.{i}.attn1.processor.conv.*`` / ``.norm.*``). The token grid
(h, w) = (H/p, W/p) of the current forward is recorded on the processors by a forward
pre-hook on the model, so non-square latents work. ``disable_kv_compression`` puts back
diffusers' stock ``AttnProcessor2_0``.

Example::

    >>> from histosynth.synthesis.engine import tiny_transformer_config
    >>> from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
    >>> config = {**tiny_transformer_config(64), "num_layers": 4}
    >>> model = PixCellTransformer2DModel.from_config(config)
    >>> model = enable_kv_compression(model, ratio=2)  # the second half of the blocks
    >>> model.config.kv_compress_ratio, model.config.kv_compress_blocks
    (2, [2, 3])
    >>> model = disable_kv_compression(model)  # diffusers' stock processor again
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from histosynth.synthesis.errors import EngineError

__all__ = [
    "KVCompressionAttnProcessor",
    "KVCompressionParameters",
    "default_kv_compression_blocks",
    "disable_kv_compression",
    "enable_kv_compression",
    "kv_compression_parameter_count",
]


class KVCompressionAttnProcessor(nn.Module):
    """Self-attention processor that pools keys and values over the token grid by ``ratio``.

    Args:
        channels: width C of the projected keys/values (``attn.inner_dim``).
        ratio: pooling factor R ≥ 2 along each grid axis (keys/values shrink R²-fold).
        norm: follow the conv with ``LayerNorm(C)`` (PixArt-Σ does).
    """

    def __init__(self, channels: int, ratio: int = 2, norm: bool = True) -> None:
        super().__init__()
        if int(ratio) != ratio or ratio < 2:
            raise EngineError(f"expected an integer KV-compression ratio >= 2, got {ratio}")
        self.ratio = int(ratio)
        self.conv = nn.Conv2d(
            channels, channels, kernel_size=self.ratio, stride=self.ratio, groups=channels
        )
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / self.ratio**2)
            self.conv.bias.zero_()
        self.norm = nn.LayerNorm(channels) if norm else None
        #: (h, w) token grid of the current forward, set by the model's pre-hook.
        self.grid: tuple[int, int] | None = None

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, grid={self.grid}"

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The (h, w) grid of ``num_tokens`` row-major tokens: the recorded one, else square."""
        if self.grid is not None and self.grid[0] * self.grid[1] == num_tokens:
            return self.grid
        side = math.isqrt(num_tokens)
        if side * side == num_tokens:
            return side, side
        raise EngineError(
            f"KV-compression: cannot tell the token grid of {num_tokens} tokens "
            f"(recorded grid {self.grid}); call the model, not the attention layer alone"
        )

    def compress(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, h·w, C] row-major tokens → [B, ⌊h/R⌋·⌊w/R⌋, C]."""
        batch, _, channels = tokens.shape
        height, width = grid
        if height < self.ratio or width < self.ratio:
            raise EngineError(
                f"KV-compression: token grid {height}x{width} is smaller than ratio {self.ratio}"
            )
        image = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        pooled = self.conv(image).flatten(2).transpose(1, 2)
        return pooled if self.norm is None else self.norm(pooled)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``AttnProcessor2_0`` for self-attention."""
        if encoder_hidden_states is not None:
            raise EngineError("KV-compression applies to self-attention only (attn1)")
        if attention_mask is not None:
            raise EngineError("KV-compression does not support a self-attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
            grid = (height, width)
        else:
            grid = self.token_grid(hidden_states.shape[1])
        batch, num_tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        if attn.norm_k is not None:  # qk-norm acts on full-length keys, before pooling
            key = attn.norm_k(key.view(batch, num_tokens, attn.heads, head_dim))
            key = key.reshape(batch, num_tokens, inner_dim)
        key = self.compress(key, grid)
        value = self.compress(value, grid)

        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _record_token_grid(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: store the patch grid (H/p, W/p) of this call on every KV processor."""
    latents = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        return
    patch = model.config.patch_size
    grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
    for module in model.modules():
        if isinstance(module, KVCompressionAttnProcessor):
            module.grid = grid


def default_kv_compression_blocks(num_blocks: int) -> list[int]:
    """The second half of the blocks (14–27 of 28, PixArt-Σ's 1024² setting)."""
    return list(range(num_blocks // 2, num_blocks))


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise EngineError(
            f"expected a PixArt-style model with transformer_blocks, got {type(model).__name__}"
        )
    return blocks


def enable_kv_compression(
    model: nn.Module,
    ratio: int = 2,
    blocks: Sequence[int] | None = None,
    norm: bool = True,
) -> nn.Module:
    """Compress keys/values of self-attention (``attn1``) in ``blocks`` by ``ratio`` per axis.

    Fresh convs start as R×R average pooling (and a fresh LayerNorm when ``norm``); any
    earlier compression is replaced. ``blocks=None`` = the second half. The setting is
    written to ``model.config`` (``kv_compress_ratio``, ``kv_compress_blocks``,
    ``kv_compress_norm``). Returns ``model``.
    """
    if int(ratio) != ratio or ratio < 2:  # checked before anything is changed
        raise EngineError(f"expected an integer KV-compression ratio >= 2, got {ratio}")
    transformer_blocks = _blocks(model)
    count = len(transformer_blocks)
    chosen = (
        default_kv_compression_blocks(count) if blocks is None else sorted({int(b) for b in blocks})
    )
    bad = [b for b in chosen if not 0 <= b < count]
    if bad:
        raise EngineError(f"KV-compression blocks {bad} outside 0..{count - 1}")
    disable_kv_compression(model)
    for index in chosen:
        attn = transformer_blocks[index].attn1
        weight = attn.to_k.weight
        processor = KVCompressionAttnProcessor(attn.to_k.out_features, ratio=ratio, norm=norm)
        attn.set_processor(processor.to(device=weight.device, dtype=weight.dtype))
    model._kv_compression_hook = model.register_forward_pre_hook(
        _record_token_grid, with_kwargs=True
    )
    _record_setting(model, ratio=int(ratio), blocks=chosen, norm=bool(norm))
    return model


def disable_kv_compression(model: nn.Module) -> nn.Module:
    """Put diffusers' stock ``AttnProcessor2_0`` back on every compressed ``attn1``.

    The compressed model's conv/norm weights are dropped; the config records ratio None.
    Returns ``model``.
    """
    for block in _blocks(model):
        if isinstance(block.attn1.processor, KVCompressionAttnProcessor):
            block.attn1.set_processor(AttnProcessor2_0())
    hook = model.__dict__.pop("_kv_compression_hook", None)
    if hook is not None:
        hook.remove()
    if "kv_compress_ratio" in model.config:
        _record_setting(model, ratio=None, blocks=None, norm=True)
    return model


def _record_setting(
    model: nn.Module, ratio: int | None, blocks: list[int] | None, norm: bool
) -> None:
    """Write the setting to the config, also for ``from_config(model.config)`` copies.

    diffusers drops config keys listed in ``_use_default_values`` when it rebuilds a model
    from an in-memory config, so the KV keys are taken off that list.
    """
    names = ("kv_compress_ratio", "kv_compress_blocks", "kv_compress_norm")
    record: dict[str, Any] = dict(zip(names, (ratio, blocks, norm), strict=True))
    defaults = model.config.get("_use_default_values")
    if defaults is not None:
        record["_use_default_values"] = [k for k in defaults if k not in names]
    model.register_to_config(**record)


class KVCompressionParameters(NamedTuple):
    """Parameters added by KV-compression: ``extra`` of ``total`` (``fraction`` = ratio)."""

    extra: int
    total: int
    fraction: float


def kv_compression_parameter_count(model: nn.Module) -> KVCompressionParameters:
    """Count the conv/norm parameters of the KV processors against the whole model."""
    extra = sum(
        p.numel()
        for module in model.modules()
        if isinstance(module, KVCompressionAttnProcessor)
        for p in module.parameters()
    )
    total = sum(p.numel() for p in model.parameters())
    return KVCompressionParameters(extra, total, extra / total if total else 0.0)
