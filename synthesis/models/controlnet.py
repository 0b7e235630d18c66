"""A vessel-mask ControlNet for the PixCell transformer, in diffusers' idiom (issue 29).

:class:`PixCellControlNet` is a trainable copy of the first N blocks of a
:class:`~histosynth.synthesis.models.transformer.PixCellTransformer2DModel` (with its patch
embedding, timestep embedding and UNI projection) that reads a binary vessel mask and
returns one residual per copied block; the base transformer adds residual ``i`` to its
hidden states after block ``i`` (its ``block_residuals`` keyword).

The mask enters on the latent grid through a **small learned encoder of the binary mask**
(not the VAE's encoding of a mask image): a stride-1 conv, then log2(vae_scale_factor)
stride-2 3×3 convs with SiLU (image H×W → latent h×w = H/8×W/8, ``mask_encoder_channels``
wide), then a **zero-initialised** patchifying conv (kernel = stride = patch size) to the
transformer width, added to the patch-embedded latent tokens. It is cheap on the CPU, needs
no VAE pass per mask and learns what a vessel outline means for the latents. Every copied
block is followed by a **zero-initialised** ``Linear(hidden, hidden)``
(``controlnet_blocks``) whose output, times ``conditioning_scale``, is the residual — so a
fresh ControlNet changes nothing in the base output.

Attention processors, KV-compression and gradient checkpointing are those of the
transformer: the blocks live in ``transformer_blocks`` so that
:func:`~histosynth.synthesis.models.kv_compression.enable_kv_compression`,
:func:`~histosynth.synthesis.engine_options.set_models_attention` and diffusers'
``enable_gradient_checkpointing`` work on it unchanged, and :meth:`from_transformer`
mirrors the transformer's setting.

Example::

    >>> from histosynth.synthesis.tiny_models import tiny_transformer_config
    >>> from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
    >>> base = PixCellTransformer2DModel(**tiny_transformer_config(64))
    >>> controlnet = PixCellControlNet.from_transformer(base, num_layers=1)
    >>> latents, mask = torch.randn(1, 16, 8, 8), torch.zeros(1, 1, 64, 64)
    >>> rows, t = base.null_condition(1), torch.tensor([500])
    >>> residuals = controlnet(latents, t, rows, mask)
    >>> out = base(latents, rows, t, block_residuals=residuals).sample  # == base(...) while fresh
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, XFormersAttnProcessor
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

from histosynth.synthesis.engine_options import set_models_attention
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.kv_compression import enable_kv_compression
from histosynth.synthesis.models.transformer import UNIPositionEmbedding, UNIProjection

__all__ = [
    "MASK_ENCODERS",
    "SHARED_KEYS",
    "PixCellControlNet",
    "controlnet_config_from_transformer",
    "match_transformer_options",
]

#: Mask encoders this module knows: ``"conv"`` = the small learned conv encoder.
MASK_ENCODERS = ("conv",)

#: Transformer config keys a ControlNet shares (the block and embedding shapes).
SHARED_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "dropout",
    "cross_attention_dim",
    "attention_bias",
    "sample_size",
    "patch_size",
    "activation_fn",
    "num_embeds_ada_norm",
    "upcast_attention",
    "norm_elementwise_affine",
    "norm_eps",
    "interpolation_scale",
    "caption_channels",
    "caption_num_tokens",
    "attention_type",
)


def controlnet_config_from_transformer(
    transformer_config: Mapping[str, Any], num_layers: int
) -> dict[str, Any]:
    """The :class:`PixCellControlNet` config for the first ``num_layers`` blocks of a
    PixCell transformer with config ``transformer_config`` (a model's ``config`` or its
    ``config.json`` as a dict); KV-compression is kept on the copied blocks it covers."""
    total = int(transformer_config.get("num_layers", 28))
    if int(num_layers) != num_layers or not 1 <= num_layers <= total:
        raise EngineError(
            f"expected a ControlNet of 1..{total} layers (the transformer has {total}), "
            f"got {num_layers}",
            item="num_layers",
        )
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(PixCellControlNet.__init__).parameters.items()
    }
    config = {k: transformer_config.get(k, defaults.get(k)) for k in SHARED_KEYS}
    extra = transformer_config.get("use_additional_conditions")
    if extra is None:  # PixArt's rule: only the 1024² (sample_size 128) model adds them
        extra = config["sample_size"] == 128
    ratio = transformer_config.get("kv_compress_ratio")
    blocks = [b for b in transformer_config.get("kv_compress_blocks") or [] if b < num_layers]
    return {
        **config,
        "num_layers": int(num_layers),
        "use_additional_conditions": bool(extra),
        "kv_compress_ratio": ratio if ratio is not None and blocks else None,
        "kv_compress_blocks": blocks if ratio is not None and blocks else None,
        "kv_compress_norm": bool(transformer_config.get("kv_compress_norm", True)),
    }


def _zero(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def _conv_mask_encoder(channels: Sequence[int], downsamplings: int) -> nn.Sequential:
    """1 → channels[0] (stride 1), then ``downsamplings`` stride-2 3×3 convs, SiLU between."""
    widths = list(channels)
    if len(widths) != downsamplings + 1 or min(widths) < 1:
        raise EngineError(
            f"expected {downsamplings + 1} positive mask_encoder_channels for "
            f"{downsamplings} stride-2 convs, got {widths}",
            item="mask_encoder_channels",
        )
    layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, padding=1), nn.SiLU()]
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Conv2d(width_in, width_out, 3, stride=2, padding=1), nn.SiLU()]
    return nn.Sequential(*layers)


class PixCellControlNet(ModelMixin, ConfigMixin):
    """ControlNet branch for the PixCell DiT: a binary vessel mask → per-block residuals.

    Config: the transformer's block and embedding shapes (see
    :func:`controlnet_config_from_transformer`), ``num_layers`` (blocks copied, N),
    ``mask_encoder`` (``"conv"``), ``mask_encoder_channels`` (widths of its convs, one more
    than log2(``vae_scale_factor``)), ``vae_scale_factor`` (image px per latent px, 8) and
    the KV-compression record ``kv_compress_*`` (as the transformer's).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["BasicTransformerBlock", "PatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_layers: int = 7,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 16,
        dropout: float = 0.0,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool = False,
        caption_channels: int = 1536,
        caption_num_tokens: int = 16,
        attention_type: str | None = "default",
        mask_encoder: str = "conv",
        mask_encoder_channels: Sequence[int] = (16, 32, 96, 256),
        vae_scale_factor: int = 8,
        kv_compress_ratio: int | None = None,
        kv_compress_blocks: Sequence[int] | None = None,
        kv_compress_norm: bool = True,
    ) -> None:
        super().__init__()
        if mask_encoder not in MASK_ENCODERS:
            raise EngineError(
                f"expected a mask encoder in {list(MASK_ENCODERS)}, got {mask_encoder!r}",
                item="mask_encoder",
            )
        downsamplings = int(math.log2(vae_scale_factor)) if vae_scale_factor >= 1 else -1
        if downsamplings < 0 or 2**downsamplings != vae_scale_factor:
            raise EngineError(
                f"expected a power-of-two vae_scale_factor, got {vae_scale_factor}",
                item="vae_scale_factor",
            )
        self.inner_dim = num_attention_heads * attention_head_dim
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
            interpolation_scale=(
                interpolation_scale
                if interpolation_scale is not None
                else max(sample_size // 64, 1)
            ),
        )
        self.adaln_single = AdaLayerNormSingle(
            self.inner_dim, use_additional_conditions=use_additional_conditions
        )
        self.caption_projection = UNIProjection(
            caption_channels, self.inner_dim, num_tokens=caption_num_tokens
        )
        self.y_pos_embed = None
        if caption_num_tokens > 1:
            self.y_pos_embed = UNIPositionEmbedding(
                caption_num_tokens, caption_channels, base_size=sample_size // patch_size
            )
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    self.inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    cross_attention_dim=cross_attention_dim,
                    activation_fn=activation_fn,
                    num_embeds_ada_norm=num_embeds_ada_norm,
                    attention_bias=attention_bias,
                    upcast_attention=upcast_attention,
                    norm_type="ada_norm_single",
                    norm_elementwise_affine=norm_elementwise_affine,
                    norm_eps=norm_eps,
                    attention_type=attention_type,
                )
                for _ in range(num_layers)
            ]
        )
        self.mask_embedding = _conv_mask_encoder(mask_encoder_channels, downsamplings)
        self.mask_projection = _zero(
            nn.Conv2d(mask_encoder_channels[-1], self.inner_dim, patch_size, stride=patch_size)
        )
        self.controlnet_blocks = nn.ModuleList(
            [_zero(nn.Linear(self.inner_dim, self.inner_dim)) for _ in range(num_layers)]
        )
        if kv_compress_ratio is not None:
            enable_kv_compression(
                self, ratio=kv_compress_ratio, blocks=kv_compress_blocks, norm=kv_compress_norm
            )

    @classmethod
    def from_transformer(
        cls,
        transformer: nn.Module,
        num_layers: int = 7,
        mask_encoder: str = "conv",
        mask_encoder_channels: Sequence[int] = (16, 32, 96, 256),
        vae_scale_factor: int = 8,
    ) -> PixCellControlNet:
        """A fresh ControlNet whose embeddings and first ``num_layers`` blocks are copies of
        ``transformer``'s (weights, KV-compression convs, buffers), on its device and dtype,
        with its attention implementation and gradient-checkpointing switch; mask encoder
        new, zero projections zero."""
        config = controlnet_config_from_transformer(transformer.config, num_layers)
        weight = next(transformer.parameters())
        with torch.device(weight.device):
            controlnet = cls(
                **config,
                mask_encoder=mask_encoder,
                mask_encoder_channels=tuple(mask_encoder_channels),
                vae_scale_factor=vae_scale_factor,
            )
        if controlnet.dtype != weight.dtype:
            controlnet.to(dtype=weight.dtype)
        for name in ("pos_embed", "adaln_single", "caption_projection", "y_pos_embed"):
            source, target = getattr(transformer, name), getattr(controlnet, name)
            if target is not None:
                target.load_state_dict(source.state_dict())
        for index, block in enumerate(controlnet.transformer_blocks):
            block.load_state_dict(transformer.transformer_blocks[index].state_dict())
        match_transformer_options(controlnet, transformer)
        return controlnet

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        mask: torch.Tensor,
        conditioning_scale: float = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the base's first N blocks, each [B, tokens, hidden].

        ``hidden_states``: latents [B, in_channels, h, w] (as the transformer's);
        ``timestep`` [B]; ``encoder_hidden_states``: UNI rows [B, tokens, channels] (or the
        null condition); ``mask``: binary vessel mask [B, 1, h·f, w·f] or [B, h·f, w·f] at
        image resolution (f = ``vae_scale_factor``), 1 = vessel; ``conditioning_scale``
        multiplies every residual (0 = no effect).
        """
        batch = hidden_states.shape[0]
        mask = self._check_inputs(hidden_states, encoder_hidden_states, mask)
        tokens = self.pos_embed(hidden_states)
        mask_features = self.mask_projection(self.mask_embedding(mask.to(tokens.dtype)))
        tokens = tokens + mask_features.flatten(2).transpose(1, 2)
        if self.config.use_additional_conditions and added_cond_kwargs is None:
            raise EngineError("this ControlNet needs added_cond_kwargs (resolution, aspect)")
        timestep, _ = self.adaln_single(
            timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=tokens.dtype
        )
        rows = encoder_hidden_states
        if self.y_pos_embed is not None:
            rows = self.y_pos_embed(rows)
        rows = self.caption_projection(rows).view(batch, -1, tokens.shape[-1])
        residuals = []
        for block, projection in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(
                    block, tokens, None, rows, None, timestep, cross_attention_kwargs, None
                )
            else:
                tokens = block(
                    tokens,
                    encoder_hidden_states=rows,
                    timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            residuals.append(projection(tokens) * conditioning_scale)
        return residuals

    def _check_inputs(
        self, latents: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The mask as [B, 1, H, W]; one EngineError line for a wrong mask or condition."""
        config = self.config
        batch, _, height, width = latents.shape
        expected_rows = (batch, config.caption_num_tokens, config.caption_channels)
        if rows is None or tuple(rows.shape) != expected_rows:
            got = None if rows is None else list(rows.shape)
            raise EngineError(f"expected UNI rows {list(expected_rows)}, got {got}")
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        factor = config.vae_scale_factor
        expected = (batch, 1, height * factor, width * factor)
        if tuple(mask.shape) != expected:
            raise EngineError(
                f"expected a vessel mask {list(expected)} ({factor}× the latent grid "
                f"{height}x{width}), got {list(mask.shape)}",
                item="mask",
            )
        return mask


def match_transformer_options(controlnet: nn.Module, transformer: nn.Module) -> nn.Module:
    """Give ``controlnet`` the transformer's attention implementation (xFormers when the
    transformer uses it, else SDPA) and gradient-checkpointing switch; returns it.
    KV-compression is set from the config (see :func:`controlnet_config_from_transformer`)."""
    uses_xformers = any(
        isinstance(module.processor, XFormersAttnProcessor)
        for module in transformer.modules()
        if isinstance(module, Attention)
    )
    set_models_attention([controlnet], "xformers" if uses_xformers else "sdpa")
    if getattr(transformer, "gradient_checkpointing", False):
        controlnet.enable_gradient_checkpointing()
    return controlnet
