"""PixCell denoiser: diffusers' PixArt DiT conditioned on UNI2-h rows instead of text.

The class reproduces the layout of PixCell's released diffusers folders
(``StonyBrook-CVLab/PixCell-256`` / ``PixCell-1024``, subfolder ``transformer/``, config
``_class_name: PixCellTransformer2DModel``), so ``from_pretrained(<local folder>)`` loads
the real weights. What PixCell adds to ``PixArtTransformer2DModel``:

* ``caption_projection``: Linear(caption_channels → hidden) → GELU(tanh) → Linear(hidden →
  hidden) (submodules ``linear_1``, ``act_1``, ``linear_2``, as in diffusers'
  ``PixArtAlphaTextProjection``) plus the persistent buffer ``uncond_embedding``
  [caption_num_tokens, caption_channels]: the learned null condition for classifier-free
  guidance.
* ``y_pos_embed`` (only when ``caption_num_tokens > 1``): a fixed 2-D sin-cos embedding
  over the √tokens × √tokens grid of UNI rows, persistent buffer ``y_pos_embed.y_pos_embed``
  [1, tokens, caption_channels], added to the UNI rows *before* the projection.

Example::

    >>> model = PixCellTransformer2DModel(num_layers=2, num_attention_heads=2,
    ...     attention_head_dim=32, cross_attention_dim=64, in_channels=16, out_channels=32,
    ...     sample_size=16, caption_channels=32, caption_num_tokens=4)
    >>> latents = torch.randn(1, 16, 16, 16)
    >>> uni = model.null_condition(1)  # [1, 4, 32]
    >>> model(latents, uni, torch.tensor([500])).sample.shape
    torch.Size([1, 32, 16, 16])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from torch import nn

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.kv_compression import enable_kv_compression

__all__ = [
    "PixCellTransformer2DModel",
    "UNIPositionEmbedding",
    "UNIProjection",
    "uni_position_embedding",
]

#: PixCell fixes the interpolation scale of the UNI-grid embedding to 2 for every model size.
UNI_GRID_INTERPOLATION_SCALE = 2.0


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos features [len(positions), dim] of 1-D positions (first half sin, then cos)."""
    frequencies = torch.arange(dim // 2, dtype=torch.float64, device=positions.device)
    frequencies = 1.0 / 10000 ** (frequencies / (dim / 2.0))
    angles = torch.outer(positions.to(torch.float64), frequencies)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def uni_position_embedding(
    num_tokens: int,
    dim: int,
    base_size: int,
    interpolation_scale: float = UNI_GRID_INTERPOLATION_SCALE,
) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a square grid of UNI rows, shape [1, num_tokens, dim].

    Rows are ordered row-major over the √n × √n grid of crops. A grid index ``i`` sits at
    position ``i · base_size / √n / interpolation_scale + base_size // n`` (PixCell's
    phase); the first ``dim/2`` channels encode the column, the last ``dim/2`` the row,
    each as [sin | cos] with frequencies 1/10000^(2k/(dim/2)). ``base_size`` is the latent
    patch grid side (``sample_size // patch_size``).
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise EngineError(
            f"expected a square number of UNI rows, got caption_num_tokens={num_tokens}"
        )
    if dim % 4:
        raise EngineError(f"expected caption_channels divisible by 4, got {dim}")
    phase = base_size // num_tokens
    index = torch.arange(side, dtype=torch.float32)
    coords = index / (side / base_size) / interpolation_scale
    cols = coords.repeat(side) + phase  # token t = row * side + col
    rows = coords.repeat_interleave(side) + phase
    embedding = torch.cat([_sincos_1d(cols, dim // 2), _sincos_1d(rows, dim // 2)], dim=1)
    return embedding.float().unsqueeze(0)


class UNIProjection(nn.Module):
    """UNI rows → transformer width: Linear → GELU(tanh) → Linear, plus the null condition.

    ``uncond_embedding`` [num_tokens, in_features] is a persistent buffer (saved with the
    weights, not trained by the optimiser), initialised N(0, 1/in_features).
    """

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int = 1) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=True)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True)
        self.register_buffer(
            "uncond_embedding", torch.randn(num_tokens, in_features) / in_features**0.5
        )

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Project [..., in_features] to [..., hidden_size]."""
        return self.linear_2(self.act_1(self.linear_1(rows)))


class UNIPositionEmbedding(nn.Module):
    """Adds the fixed grid embedding (persistent buffer ``y_pos_embed``) to UNI rows."""

    def __init__(self, num_tokens: int, dim: int, base_size: int) -> None:
        super().__init__()
        self.register_buffer("y_pos_embed", uni_position_embedding(num_tokens, dim, base_size))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, num_tokens, dim] → rows + embedding, in the dtype of ``rows``."""
        return (rows + self.y_pos_embed).to(rows.dtype)


class PixCellTransformer2DModel(PixArtTransformer2DModel, PeftAdapterMixin):
    """PixArt-XL/2 DiT conditioned on UNI2-h rows (PixCell), with peft adapters.

    Config keys are PixArt's plus ``caption_num_tokens`` (UNI rows per image: 1 at 256²,
    16 at 1024²) and the KV-compression record ``kv_compress_ratio`` /
    ``kv_compress_blocks`` / ``kv_compress_norm`` (ratio ``None`` = off; see
    :func:`histosynth.synthesis.models.kv_compression.enable_kv_compression`), so a saved
    compressed model is rebuilt compressed by ``from_pretrained``.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        caption_num_tokens: int = 1,
        attention_type: str | None = "default",
        kv_compress_ratio: int | None = None,
        kv_compress_blocks: Sequence[int] | None = None,
        kv_compress_norm: bool = True,
    ) -> None:
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels,
            attention_type=attention_type,
        )
        if caption_num_tokens < 1:
            raise EngineError(f"expected caption_num_tokens >= 1, got {caption_num_tokens}")
        self.caption_projection = None
        self.y_pos_embed = None
        if caption_channels is not None:
            self.caption_projection = UNIProjection(
                caption_channels, self.inner_dim, num_tokens=caption_num_tokens
            )
            if caption_num_tokens > 1:
                self.y_pos_embed = UNIPositionEmbedding(
                    caption_num_tokens, caption_channels, base_size=sample_size // patch_size
                )
        if kv_compress_ratio is not None:
            enable_kv_compression(
                self, ratio=kv_compress_ratio, blocks=kv_compress_blocks, norm=kv_compress_norm
            )

    def null_condition(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The learned null condition for CFG, [batch_size, caption_num_tokens, caption_channels].

        A fresh tensor (not a view of the buffer); pass it as ``encoder_hidden_states``.
        """
        if self.caption_projection is None:
            raise EngineError("this model has no UNI projection (caption_channels is None)")
        uncond = self.caption_projection.uncond_embedding
        rows = uncond.unsqueeze(0).expand(batch_size, -1, -1)
        return rows.to(dtype=dtype or uncond.dtype, device=device or uncond.device, copy=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        block_residuals: Sequence[torch.Tensor] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and σ) for latents [B, in_channels, H, W] at ``timestep`` [B].

        ``encoder_hidden_states`` are the UNI rows [B, caption_num_tokens, caption_channels]
        (or :meth:`null_condition`). Returns [B, out_channels, H, W]; H and W must be
        multiples of ``patch_size`` and need not be equal. ``block_residuals`` (a
        ControlNet's output, each [B, tokens, hidden]) are added to the hidden states after
        block ``i`` for ``i < len(block_residuals)``; ``None`` is the plain forward.
        """
        if self.caption_projection is not None:
            encoder_hidden_states = self._check_condition(hidden_states, encoder_hidden_states)
            if self.y_pos_embed is not None:
                encoder_hidden_states = self.y_pos_embed(encoder_hidden_states)
        hooks = self._add_block_residuals(block_residuals)
        try:
            return super().forward(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=return_dict,
            )
        finally:
            for hook in hooks:
                hook.remove()

    def _add_block_residuals(
        self, residuals: Sequence[torch.Tensor] | None
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks adding ``residuals[i]`` to block ``i``'s output, for one call.

        The hooks run inside a checkpointed block too; diffusers' non-reentrant
        checkpointing passes gradients to the residuals (an addition saves no tensors, so
        the recomputation without the hooks is the same).
        """
        if residuals is None:
            return []
        if len(residuals) > len(self.transformer_blocks):
            raise EngineError(
                f"expected at most {len(self.transformer_blocks)} block residuals, "
                f"got {len(residuals)}"
            )

        def adder(residual: torch.Tensor) -> Any:
            return lambda _module, _args, output: output + residual.to(output.dtype)

        return [
            block.register_forward_hook(adder(residual))
            for block, residual in zip(self.transformer_blocks, residuals, strict=False)
        ]

    def _check_condition(
        self, hidden_states: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        tokens, channels = self.config.caption_num_tokens, self.config.caption_channels
        expected = f"[{hidden_states.shape[0]}, {tokens}, {channels}]"
        if rows is None:
            raise EngineError(f"expected UNI rows {expected} as encoder_hidden_states, got None")
        shape = tuple(rows.shape)
        if shape != (hidden_states.shape[0], tokens, channels):
            raise EngineError(f"expected UNI rows {expected}, got {list(shape)}")
        return rows
