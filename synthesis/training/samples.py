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

__all__ = ["sample_grid"]


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
