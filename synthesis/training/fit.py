"""Does a set of training samples fit a model? One check for LoRA and full fine-tuning."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from histosynth.synthesis.errors import EngineError

__all__ = ["check_samples_fit", "model_tokens_at"]

VAE_DOWNSCALE = 8


def model_tokens_at(model: nn.Module) -> tuple[int, int, int]:
    """``(resolution px, UNI rows, row width)`` a PixCell transformer takes."""
    cfg = model.config
    return (
        int(cfg.sample_size) * VAE_DOWNSCALE,
        int(cfg.caption_num_tokens),
        int(cfg.caption_channels),
    )


def check_samples_fit(
    info: Any,
    *,
    resolution: int,
    tokens: int,
    dim: int,
    latent_channels: int,
    vae_hash: str | None = None,
    encoder_hash: str | None = None,
) -> None:
    """Raise one :class:`EngineError` naming the cache when its samples do not fit.

    ``info`` is a ``CacheInfo`` (``path, tile_size, encoder_crop, rows, dim,
    latent_channels, vae_hash, encoder_hash``). The samples are read at ``resolution``
    px — the cache's tile size or a crop of it aligned to the encoder's crop grid — and
    must give ``tokens`` rows of ``dim``; the VAE and encoder hashes, when given, must be
    the ones the cache was built with.
    """
    path = getattr(info, "path", None)
    if vae_hash is not None and info.vae_hash != vae_hash:
        raise EngineError(
            "the cache was built with another VAE than this model's (VAE weight hash "
            f"{info.vae_hash[:12]}…, the model's {vae_hash[:12]}…); build the cache with "
            "the same --model",
            path=path,
        )
    if encoder_hash is not None and info.encoder_hash != encoder_hash:
        raise EngineError(
            "the cache was built with another conditioning encoder than this model's "
            f"(encoder weight hash {info.encoder_hash[:12]}…, the model's "
            f"{encoder_hash[:12]}…); build the cache with the same --model",
            path=path,
        )
    if info.latent_channels != latent_channels:
        raise EngineError(
            f"the cache holds {info.latent_channels}-channel latents, the model takes "
            f"{latent_channels}",
            path=path,
        )
    if info.dim != dim:
        raise EngineError(
            f"the cache's condition rows are {info.dim}-d, the model takes {dim}", path=path
        )
    crop = int(info.encoder_crop)
    if resolution > info.tile_size or resolution % crop:
        raise EngineError(
            f"the cache holds {info.tile_size} px tiles (encoder crops of {crop} px): it "
            f"cannot give {resolution} px samples (the tile size, or a smaller multiple of "
            f"{crop} px); build a cache of {resolution} px tiles",
            path=path,
        )
    rows = (resolution // crop) ** 2
    if rows != tokens:
        side = math.isqrt(tokens)
        raise EngineError(
            f"{resolution} px samples of this cache have {rows} condition rows, the model "
            f"takes {tokens} ({side}×{side} crops of {resolution // max(side, 1)} px)",
            path=path,
        )
