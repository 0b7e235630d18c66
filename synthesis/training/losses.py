"""What training minimises and what validation measures: the ε-prediction losses.

For each sample a posterior draw ``z₀``, noise ``ε``, a timestep ``t`` and — with
probability ``uncond_prob`` — the learned null condition instead of its UNI rows, all from
one ``torch.Generator`` (:func:`draw_sample`); the loss is the MSE between ε and the
first ``C`` of the model's ``2C`` output channels (PixArt's learned-σ split), weighted by
Min-SNR-γ (``min(SNR, γ) / SNR``, diffusers' ``compute_snr``). A ControlNet's training may
weigh the latent cells its vessel mask touches ``mask_loss_weight`` times the others (the
mean over cells normalised by the mean weight, so a tile without a vessel keeps its plain
loss): the vessel is a small share of a tile, and what the mask should teach.

Validation: the held-out samples, each at one timestep drawn inside each of 4 equal bins
of the training timestep range, with noise fixed by the seed; plain (unweighted) MSE,
always conditional. ``val_loss`` is the mean, ``val_loss_t<lo>-<hi>`` the bins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from histosynth.synthesis.training.data import EncodedSamples, collate, sample_generator

__all__ = [
    "VALIDATION_BINS",
    "diffusion_loss",
    "draw_sample",
    "validation_losses",
    "vessel_cell_weights",
]

VALIDATION_BINS = 4
"""Timestep bins of the validation loss."""


def draw_sample(
    dataset: EncodedSamples,
    index: int,
    generator: torch.Generator,
    *,
    timestep_range: tuple[int, int],
    uncond_prob: float,
    mask_dropout: float | None = None,
) -> dict[str, Any]:
    """One sample and its noise, timestep and dropout, all from ``generator``.

    With ``mask_dropout`` (a ControlNet's training) also the sample's vessel mask
    (``mask`` float32 [1, H, W] of 0/1) and whether it is dropped (``mask_drop``), drawn
    after everything else so that the other draws are those of a run without masks.
    """
    item = dataset.sample(index, generator)
    latents = item["latents"].float()
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(timestep_range[0], timestep_range[1], (1,), generator=generator)
    drop = torch.rand((1,), generator=generator) < uncond_prob
    out = {
        "latents": latents,
        "rows": item["rows"].float(),
        "noise": noise,
        "timestep": t[0],
        "drop": drop[0],
    }
    if mask_dropout is not None:
        mask = torch.as_tensor(item["mask"])
        out["mask"] = (mask > (127 if mask.dtype == torch.uint8 else 0.5)).float()[None]
        out["mask_drop"] = (torch.rand((1,), generator=generator) < mask_dropout)[0]
    return out


def diffusion_loss(
    model: nn.Module,
    batch: dict[str, Any],
    noise_scheduler: Any,
    *,
    snr_gamma: float | None,
    null_rows: torch.Tensor,
    mask_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample losses [B] of a collated batch (``latents, rows, noise, timestep, drop``;
    for a ControlNet also ``mask, mask_drop``).

    ``null_rows`` [tokens, dim] replaces the rows of dropped samples; a dropped mask
    becomes the null mask (every pixel ``NULL_MASK_VALUE``), passed as ``controlnet_cond``.
    ``mask_loss_weight``: the weight of the latent cells any vessel pixel of the sample's
    mask falls in (dropped or not), relative to 1 elsewhere; 1 = plain MSE.
    """
    param = next(p for p in model.parameters())
    device = param.device
    latents = batch["latents"].to(device)
    noise = batch["noise"].to(device)
    timesteps = batch["timestep"].to(device)
    rows = batch["rows"].to(device)
    drop = batch["drop"].to(device)
    rows = torch.where(drop[:, None, None], null_rows.to(device, rows.dtype)[None], rows)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    extra = {}
    if "mask" in batch:
        from histosynth.synthesis.pipelines.control import NULL_MASK_VALUE

        mask = batch["mask"].to(device)
        dropped = batch["mask_drop"].to(device)[:, None, None, None]
        extra["controlnet_cond"] = torch.where(dropped, NULL_MASK_VALUE, mask)
    out = model(
        noisy,
        encoder_hidden_states=rows,
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
        **extra,
    )[0]
    eps = out[:, : latents.shape[1]].float()  # learned σ: [ε | variance]
    squared = (eps - noise) ** 2
    if mask_loss_weight != 1.0 and "mask" in batch:
        mask = batch["mask"].to(device)
        weights = vessel_cell_weights(mask, latents.shape[-2:], mask_loss_weight)
        losses = (squared * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
    else:
        losses = squared.mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).float()
        losses = losses * torch.clamp(snr, max=snr_gamma) / snr
    return losses


def vessel_cell_weights(
    mask: torch.Tensor, grid: Sequence[int], weight: float
) -> torch.Tensor:
    """Loss weights [B, 1, h, w] on the latent ``grid`` (h, w): ``weight`` in each cell
    that any vessel pixel of ``mask`` [B, 1, H, W] (0/1, H = h × the VAE's px per cell)
    falls in, 1 elsewhere."""
    touched = nn.functional.adaptive_max_pool2d(mask.float(), tuple(int(g) for g in grid))
    return 1.0 + (float(weight) - 1.0) * (touched > 0).float()


def _bins(timestep_range: tuple[int, int]) -> list[tuple[int, int]]:
    low, high = timestep_range
    edges = [low + round((high - low) * k / VALIDATION_BINS) for k in range(VALIDATION_BINS + 1)]
    return [(a, max(b, a + 1)) for a, b in itertools.pairwise(edges)]


@torch.no_grad()
def validation_losses(
    model: nn.Module,
    dataset: EncodedSamples,
    indices: Sequence[int],
    noise_scheduler: Any,
    *,
    seed: int,
    batch_size: int,
    timestep_range: tuple[int, int] = (0, 1000),
    mask_dropout: float | None = None,
) -> dict[str, float]:
    """Held-out ε-MSE: mean (``val_loss``) and per timestep bin (``val_loss_t<lo>-<hi>``).

    Deterministic for a seed: the same weights give the same numbers. ``mask_dropout``
    (a ControlNet): ``0`` validates with every mask, ``1`` with the null mask.
    """
    if not indices:
        return {}
    draws, bins = [], _bins(timestep_range)
    for index in indices:
        for b, (low, high) in enumerate(bins):
            g = sample_generator(seed, "validation", index, b)
            draw = draw_sample(
                dataset,
                index,
                g,
                timestep_range=(low, high),
                uncond_prob=0.0,
                mask_dropout=mask_dropout,
            )
            draws.append((b, draw))
    was_training = model.training
    model.eval()
    per_bin: list[list[float]] = [[] for _ in bins]
    try:
        for start in range(0, len(draws), batch_size):
            chunk = draws[start : start + batch_size]
            batch = collate([d for _, d in chunk])
            losses = diffusion_loss(
                model,
                batch,
                noise_scheduler,
                snr_gamma=None,
                null_rows=torch.zeros(batch["rows"].shape[1:]),
            )
            for (b, _), value in zip(chunk, losses.tolist(), strict=True):
                per_bin[b].append(value)
    finally:
        model.train(was_training)
    out = {"val_loss": float(sum(map(sum, per_bin)) / len(draws))}
    for (low, high), values in zip(bins, per_bin, strict=True):
        out[f"val_loss_t{low}-{high}"] = float(sum(values) / len(values))
    return out

