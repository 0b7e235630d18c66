"""The SD3 VAE (diffusers ``AutoencoderKL``, 16 latent channels, ×8 down) and its latent codec.

Images go in and come out as RGB in [0, 1] (floats, channels-first) or ``uint8``
(numpy, channels-last), the same conventions as the encoders
(:func:`histosynth.synthesis.models.encoders.image_batch`); the VAE itself sees
[-1, 1]. Latents are *scaled*: ``(z − shift_factor) · scaling_factor`` with SD3's
``scaling_factor 1.5305`` and ``shift_factor 0.0609``, the space the denoiser works in.
The scaling is applied in exactly one place, :func:`scale_latents` (used by
:meth:`LatentCodec.to_latents` and the feature cache) / :meth:`LatentCodec.from_latents`.

Example:
    >>> vae = load_vae("~/weights/stable-diffusion-3.5-large/vae")  # doctest: +SKIP
    >>> import numpy as np
    >>> from diffusers import AutoencoderKL
    >>> from histosynth.synthesis.engine import TINY_VAE_CONFIG
    >>> codec = LatentCodec(AutoencoderKL.from_config(TINY_VAE_CONFIG))  # UNTRAINED, SD3 shapes
    >>> latents = codec.encode(np.zeros((64, 64, 3), np.uint8))
    >>> tuple(latents.shape)  # [1, 16, 128, 128] for a 1024² tile
    (1, 16, 8, 8)
    >>> codec.decode(latents).shape  # uint8 RGB
    (1, 64, 64, 3)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import Tensor

from histosynth.synthesis.config_limits import (
    check_model_finite,
    check_vae_config,
    read_json_object,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.foreign_errors import as_engine_error
from histosynth.synthesis.models.encoders import ImageInput, image_batch

__all__ = [
    "SD3_LATENT_CHANNELS",
    "SD3_SCALING_FACTOR",
    "SD3_SHIFT_FACTOR",
    "LatentCodec",
    "load_vae",
    "scale_latents",
]

SD3_LATENT_CHANNELS = 16
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


def scale_latents(z: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """Raw VAE latents → the denoiser's space: ``(z − shift_factor) · scaling_factor``."""
    return (z - shift_factor) * scaling_factor


def _read_config(folder: Path) -> tuple[Path, dict]:
    """The VAE folder (``folder`` or ``folder/vae``) and its parsed ``config.json``."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise EngineError("VAE folder not found (expected a diffusers folder such as the "
                          "vae/ of stabilityai/stable-diffusion-3.5-large)", path=folder)
    if not config_file.is_file():
        raise EngineError("no config.json (expected a diffusers AutoencoderKL folder)",
                          path=folder)
    return folder, read_json_object(config_file, what="the config")


def load_vae(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    check_sd3: bool = True,
) -> AutoencoderKL:
    """Load the SD3 VAE from a local diffusers folder, offline, frozen and in eval mode.

    Args:
        folder: the ``vae/`` folder (``config.json`` + ``*.safetensors``; pickled ``*.bin``
            weights are refused), or a folder holding ``vae/``.
        device, dtype: where and in which precision it runs.
        check_sd3: require SD3's latent channels (16), scaling and shift factors.

    Raises:
        EngineError: no such folder, another architecture, a config over the limits of
            :mod:`histosynth.synthesis.config_limits`, unreadable or non-finite weights
            (naming the folder, its ``config.json`` or the weights file and tensor).
    """
    folder, config = _read_config(Path(folder).expanduser())
    config_file = folder / "config.json"
    cls = config.get("_class_name")
    if cls != "AutoencoderKL":
        raise EngineError(f"expected an AutoencoderKL config, found _class_name {cls!r}",
                          path=config_file)
    if check_sd3:
        expected = {"latent_channels": SD3_LATENT_CHANNELS,
                    "scaling_factor": SD3_SCALING_FACTOR, "shift_factor": SD3_SHIFT_FACTOR}
        for key, value in expected.items():
            found = config.get(key)
            if not isinstance(found, (int, float)) or not math.isclose(found, value,
                                                                        rel_tol=1e-6):
                raise EngineError(f"expected the SD3 VAE ({key} {value}), found {found!r}",
                                  path=config_file)
    check_vae_config(config, config_file)  # before anything is built
    # diffusers raises OSError/ValueError/RuntimeError/...
    with as_engine_error("cannot load the VAE", path=folder):
        vae = AutoencoderKL.from_pretrained(
            folder, local_files_only=True, torch_dtype=dtype, use_safetensors=True
        )
    vae = vae.to(device).eval().requires_grad_(False)
    check_model_finite(vae, folder)
    return vae


class LatentCodec:
    """Images ↔ scaled latents through a VAE; the scale and shift live here only.

    Args:
        vae: a diffusers ``AutoencoderKL`` (its device and dtype are used).
        batch_size: images per VAE call (bounds memory; results do not depend on it).
    """

    def __init__(self, vae: AutoencoderKL, batch_size: int = 4) -> None:
        self.vae = vae
        self.batch_size = int(batch_size)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        # pixels per latent cell along each side (8 for SD3)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # -- the one place where scale and shift are applied

    def to_latents(self, z: Tensor) -> Tensor:
        """Raw VAE latents → the denoiser's space: ``(z − shift) · scale``."""
        return scale_latents(z, self.scaling_factor, self.shift_factor)

    def from_latents(self, latents: Tensor) -> Tensor:
        """The denoiser's space → raw VAE latents: ``latents / scale + shift``."""
        return latents / self.scaling_factor + self.shift_factor

    # -- encode

    def _pixels(self, images: ImageInput) -> Tensor:
        x = image_batch(images)
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise EngineError(f"image of {w}×{h} px: expected sides that are multiples of "
                              f"{self.downsample} px", item="images")
        return x.to(self.device, self.dtype) * 2 - 1

    def encode_posterior(self, images: ImageInput) -> tuple[Tensor, Tensor]:
        """The VAE posterior of each image, unscaled: ``(mean, std)``, float32.

        Shapes ``[B, C, H / 8, W / 8]``; this is what the feature cache stores, and
        :meth:`latents_from_posterior` turns it into latents.
        """
        x = self._pixels(images)
        means, stds = [], []
        with torch.no_grad():
            for chunk in x.split(self.batch_size):
                dist = self.vae.encode(chunk).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def latents_from_posterior(
        self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scaled latents from a posterior: ``to_latents(mean + std · ε)``, ε ~ N(0, I).

        ``generator`` (on ``mean``'s device) makes the draw reproducible.
        """
        eps = torch.randn(mean.shape, generator=generator, device=mean.device,
                          dtype=mean.dtype)
        return self.to_latents(mean + std * eps)

    def encode(
        self,
        images: ImageInput,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Scaled latents ``[B, 16, H / 8, W / 8]`` (float32) of RGB images in [0, 1].

        ``sample=False`` takes the posterior mean (deterministic); ``sample=True`` draws
        ``mean + std · ε`` with ``generator``.
        """
        mean, std = self.encode_posterior(images)
        if sample:
            return self.latents_from_posterior(mean, std, generator)
        return self.to_latents(mean)

    # -- decode

    def decode(
        self, latents: Tensor, *, output: Literal["numpy", "tensor"] = "numpy"
    ) -> np.ndarray | Tensor:
        """Images from scaled latents ``[B, C, h, w]`` (or ``[C, h, w]``).

        Returns:
            ``output="numpy"``: ``uint8`` RGB ``[B, 8h, 8w, 3]`` (rounded);
            ``output="tensor"``: float32 ``[B, 3, 8h, 8w]`` in [0, 1] on the VAE's device.
        """
        if latents.ndim == 3:
            latents = latents[None]
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise EngineError(f"expected latents [B, {self.latent_channels}, h, w], found "
                              f"{tuple(latents.shape)}", item="latents")
        z = self.from_latents(latents.to(self.device, torch.float32)).to(self.dtype)
        out = []
        with torch.no_grad():
            for chunk in z.split(self.batch_size):
                out.append(self.vae.decode(chunk).sample.float())
        images = ((torch.cat(out) + 1) / 2).clamp(0, 1)
        if output == "tensor":
            return images
        if output != "numpy":
            raise EngineError(f"expected output 'numpy' or 'tensor', found {output!r}",
                              item="output")
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
