"""A grid of validation samples: what the model makes from held-out conditions.

Top row: the held-out tiles as the VAE sees them (their latents decoded); bottom row:
tiles generated from the same UNI rows (variation pipeline, fixed seeds), so a glance
shows whether the model has learnt stain, texture and layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from histosynth.synthesis.training.data import EncodedSamples, collate, sample_generator

__all__ = ["controlnet_sample_grid", "sample_grid"]


@torch.no_grad()
def sample_grid(
    transformer: nn.Module,
    vae: Any,
    scheduler: Any,
    data: EncodedSamples,
    indices: Sequence[int],
    *,
    seed: int = 0,
    steps: int = 10,
    guidance_scale: float = 2.0,
    count: int = 4,
) -> np.ndarray:
    """uint8 RGB grid ``(2·S, n·S, 3)`` for up to ``count`` of ``indices`` (S = tile side)."""
    from histosynth.synthesis.pipelines.variation import VariationPipeline

    chosen = list(indices)[:count]
    if not chosen:
        return np.zeros((0, 0, 3), np.uint8)
    items = collate([data.sample(i, sample_generator(seed, "samples", i)) for i in chosen])
    pipe = VariationPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    try:
        made = pipe(
            uni_rows=items["rows"],
            seeds=[seed + k for k in range(len(chosen))],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
        ).images
    finally:
        transformer.train(was_training)
    real = pipe.codec.decode(items["latents"])
    top, bottom = np.concatenate(list(real), axis=1), np.concatenate(list(made), axis=1)
    return np.concatenate([top, bottom], axis=0)


@torch.no_grad()
def controlnet_sample_grid(
    model: nn.Module,
    vae: Any,
    scheduler: Any,
    data: EncodedSamples,
    indices: Sequence[int],
    *,
    seed: int = 0,
    steps: int = 10,
    strength: float = 1.0,
    guidance_scale: float = 2.0,
    count: int = 4,
) -> np.ndarray:
    """uint8 RGB grid ``(3·S, n·S, 3)`` of a ControlNet's validation samples: the held-out
    tiles (decoded latents), each with the vessel mask of the next one (white), and the
    tile re-generated at ``strength`` under that mask (so a vessel should move into the
    white outline). ``model`` is a :class:`~histosynth.synthesis.pipelines.control.
    ControlledTransformer`."""
    from histosynth.synthesis.pipelines.control import MaskControl, mask_tensor
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline

    chosen = list(indices)[:count]
    if not chosen:
        return np.zeros((0, 0, 3), np.uint8)
    items = collate([data.sample(i, sample_generator(seed, "samples", i)) for i in chosen])
    pipe = InpaintPipeline(transformer=model.transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    real = pipe.codec.decode(items["latents"])
    side = real.shape[1]
    masks = np.roll(np.stack([np.asarray(m) for m in items["mask"]]), 1, axis=0)
    masks = (masks > (127 if masks.dtype == np.uint8 else 0.5)).astype(np.uint8) * 255
    was_training = model.training
    model.eval()
    try:
        made = pipe(
            real,
            masks,
            strength=strength,
            inside=np.full((len(chosen), side, side), 255, np.uint8),
            uni_rows=items["rows"],
            seeds=[seed + k for k in range(len(chosen))],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            control=MaskControl(model.controlnet, mask_tensor(masks, side), guidance_scale),
            decode="tile",
        ).images
    finally:
        model.train(was_training)
    shown = np.repeat(masks[..., None], 3, axis=-1)
    rows = [np.concatenate(list(x), axis=1) for x in (real, shown, made)]
    return np.concatenate(rows, axis=0)
