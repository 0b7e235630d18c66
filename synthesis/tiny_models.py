"""The tiny engine's models: PixCell's design at a tiny size, seeded random weights.

A 2-block PixCell transformer (hidden 64 = 2 heads × 32, UNI width 32), a 4-block
``AutoencoderKL`` with SD3's 16 latent channels, ×8 down-sampling and SD3's scale/shift,
and a :class:`~histosynth.synthesis.models.encoders.TinyEncoder` with a 4×4 grid of
``tile_size / 4`` px crops (16 rows, like PixCell-1024). UNTRAINED: for tests, shapes and
the demo; :func:`histosynth.synthesis.engine.tiny_engine` wraps them in an engine.

Example:
    >>> tiny_transformer_config(1024)["sample_size"]  # latent side, px / 8
    128
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL

from histosynth.synthesis.devices import move_model, vae_dtype
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import TinyEncoder
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.models.vae import (
    SD3_LATENT_CHANNELS,
    SD3_SCALING_FACTOR,
    SD3_SHIFT_FACTOR,
)

__all__ = ["TINY_SEED", "TINY_VAE_CONFIG", "build_tiny_models", "tiny_transformer_config"]

TINY_SEED = 0
"""Seed of the tiny engine's random initialisation."""


def tiny_transformer_config(tile_size: int = 256) -> dict[str, Any]:
    """PixCell-1024's transformer config at a tiny size for ``tile_size`` px tiles.

    2 blocks, 2 heads × 32 (hidden 64), UNI width 32 in a 4×4 grid of 16 rows, latent side
    ``tile_size / 8``; ``interpolation_scale`` = latent side / 64 as PixCell's (0.5 at
    256 px, 2 at 1024 px).
    """
    if tile_size < 64 or tile_size % 64:
        raise EngineError(
            f"the tiny engine takes tiles of a multiple of 64 px, got {tile_size}",
            item="tile_size",
        )
    latent = tile_size // 8
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "in_channels": SD3_LATENT_CHANNELS,
        "out_channels": 2 * SD3_LATENT_CHANNELS,
        "num_layers": 2,
        "cross_attention_dim": 64,
        "attention_bias": True,
        "sample_size": latent,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": latent / 64,
        "use_additional_conditions": False,
        "caption_channels": 32,
        "caption_num_tokens": 16,
        "attention_type": "default",
    }


TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": SD3_LATENT_CHANNELS,
    "sample_size": 256,
    "scaling_factor": SD3_SCALING_FACTOR,
    "shift_factor": SD3_SHIFT_FACTOR,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""SD3's VAE structure (4 blocks: ×8 down, 16 latent channels, no quant convs) at a tiny width."""


def build_tiny_models(
    tile_size: int, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[PixCellTransformer2DModel, AutoencoderKL, TinyEncoder]:
    """``(transformer, vae, encoder)`` for ``tile_size`` px tiles, frozen, in eval mode.

    The same ``seed`` gives the same weights on every machine (built on the CPU in float32
    without touching the global RNG, then moved to ``device`` / ``dtype``; the VAE to
    :func:`~histosynth.synthesis.devices.vae_dtype`).
    """
    config = tiny_transformer_config(tile_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixCellTransformer2DModel.from_config(config)
        vae = AutoencoderKL.from_config(TINY_VAE_CONFIG)
    encoder = TinyEncoder(dim=config["caption_channels"], seed=seed, crop=tile_size // 4)
    transformer = move_model(transformer, device, dtype).eval().requires_grad_(False)
    vae = move_model(vae, device, vae_dtype(dtype)).eval().requires_grad_(False)
    return transformer, vae, encoder.to(device, dtype).eval()
