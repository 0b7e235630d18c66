"""Step 3 of context-aware inpainting: Reinhard colour transfer of the donor onto the tile.

CIELAB via OpenCV on float32 RGB in [0, 1] (``cv2.COLOR_RGB2Lab``): true CIELAB, D65,
L in [0, 100], a and b about ±127 — so "units" below are ΔE76 units. Per channel::

    out = (x − μ_D) · clip(σ_T / σ_D, 0.5, 2) + μ_T          (transferred)
    out = λ · transferred + (1 − λ) · x                        (blend, in CIELAB)

with μ/σ over the donor's mask pixels (D) and the target's tissue pixels (T). Only the
donor mask's pixels are converted and changed; the others are returned untouched, and
λ = 0 returns the donor unchanged (exactly).

>>> out = reinhard_transfer(donor, donor_mask, tile)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from histosynth.synthesis import defaults

__all__ = ["lab_stats", "local_ring", "match_surroundings", "reinhard_transfer"]


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) → float32 CIELAB of the same shape."""
    flat = np.ascontiguousarray(rgb).reshape(-1, 1, 3) if rgb.ndim != 3 else rgb
    lab = cv2.cvtColor(np.multiply(flat, np.float32(1.0 / 255.0), dtype=np.float32),
                       cv2.COLOR_RGB2Lab)
    return lab.reshape(rgb.shape)


def _to_rgb8(lab: np.ndarray) -> np.ndarray:
    """float32 CIELAB (H, W, 3) → uint8 RGB (out-of-gamut clipped, rounded half to even)."""
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return cv2.convertScaleAbs(rgb, alpha=255.0).reshape(lab.shape)


def masked_mean_std(lab: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and σ (float64) of a (H, W, 3) float32 image under a bool mask."""
    mean, std = cv2.meanStdDev(lab, mask=np.ascontiguousarray(mask).view(np.uint8))
    return mean.ravel()[:3], std.ravel()[:3]


def lab_stats(
    rgb: np.ndarray, mask: np.ndarray | None = None, *, max_pixels: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel CIELAB mean and standard deviation (float64, shape (3,)) of the uint8
    RGB (H, W, 3) image ``rgb`` where ``mask`` is non-zero (all pixels when None). Large
    selections are measured on a regular grid of every k-th row and column, keeping
    about ``max_pixels`` (deterministic; the estimates move by ≪ 1 unit)."""
    rgb = np.asarray(rgb)
    sel = np.ones(rgb.shape[:2], dtype=bool) if mask is None else np.asarray(mask) != 0
    count = int(np.count_nonzero(sel))
    if count == 0:
        raise ValueError("no pixels to measure")
    step = max(1, math.ceil(math.sqrt(count / max_pixels)))
    if step > 1:
        sub_rgb, sub_sel = rgb[::step, ::step], sel[::step, ::step]
        if np.count_nonzero(sub_sel) >= 1024:  # else a thin selection: measure it all
            rgb, sel = sub_rgb, sub_sel
    return masked_mean_std(to_lab(rgb), sel)


def _check(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _mask(mask: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.shape != shape[:2]:
        raise ValueError(f"{name}: shape {mask.shape} does not match the image {shape[:2]}")
    return mask if mask.dtype == bool else mask != 0


def reinhard_transfer(
    donor: np.ndarray,
    donor_mask: np.ndarray,
    target: np.ndarray,
    target_tissue: np.ndarray | None = None,
    *,
    blend: float = defaults.COLOUR_BLEND,
    ratio_clip: tuple[float, float] = (0.5, 2.0),
) -> np.ndarray:
    """Donor (uint8 RGB) with its mask's pixels moved towards the target's CIELAB
    statistics; a new uint8 array, pixels outside the mask unchanged.

    ``donor_mask``: (h, w), non-zero = donor; ``target``: uint8 RGB of any size (the tile,
    or the region around the placement); ``target_tissue``: target pixels to measure
    (non-zero = tissue; the caller's tissue mask, ``None``: every target pixel);
    ``blend``: λ in [0, 1];
    ``ratio_clip``: bounds of σ_T / σ_D (σ_D = 0 counts as the upper bound). Raises
    ValueError when the donor mask or the target tissue is empty.
    """
    donor = _check(donor, "donor")
    target = _check(target, "target")
    inside = _mask(donor_mask, donor.shape, "donor mask")
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    lo, hi = ratio_clip
    if not 0 < lo <= hi:
        raise ValueError(f"ratio_clip must be 0 < low ≤ high, got {ratio_clip}")
    if not inside.any():
        raise ValueError("donor mask is empty")
    if target_tissue is None:
        tissue = np.ones(target.shape[:2], dtype=bool)
    else:
        tissue = _mask(target_tissue, target.shape, "target tissue")
    if not tissue.any():
        raise ValueError("target has no tissue pixels to take colour statistics from")
    out = donor.copy()
    if blend == 0.0:
        return out
    lab = to_lab(donor)  # the whole crop: no gather, only the mask is used
    mu_d, sd_d = masked_mean_std(lab, inside)
    mu_t, sd_t = lab_stats(target, tissue)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sd_d > 0, sd_t / sd_d, hi)
    ratio = np.clip(ratio, lo, hi)
    # out = λ·((x − μ_D)·r + μ_T) + (1 − λ)·x = x·(λ·r + 1 − λ) + λ·(μ_T − μ_D·r)
    lab *= (blend * ratio + (1.0 - blend)).astype(np.float32)
    lab += (blend * (mu_t - mu_d * ratio)).astype(np.float32)
    np.copyto(out, _to_rgb8(lab), where=inside[..., None])
    return out


def local_ring(
    tissue: np.ndarray, donor_mask: np.ndarray, x: int, y: int, width: int
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Window of the tile around a mask placed at (``x``, ``y``) and, in it, the tissue
    pixels within ``width`` px of the mask (outside it)."""
    H, W = tissue.shape
    h, w = donor_mask.shape
    y0, x0 = max(0, y - width), max(0, x - width)
    y1, x1 = min(H, y + h + width), min(W, x + w + width)
    outside = np.ones((y1 - y0, x1 - x0), dtype=np.uint8)
    outside[y - y0 : y - y0 + h, x - x0 : x - x0 + w][donor_mask] = 0
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ring = (outside > 0) & (dist <= width) & tissue[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), ring


def match_surroundings(
    donor: np.ndarray,
    donor_mask: np.ndarray,
    background: np.ndarray,
    tissue: np.ndarray,
    x: int,
    y: int,
    *,
    ring: int,
    min_ring_pixels: int,
    blend: float,
) -> tuple[np.ndarray, str]:
    """(donor recoloured, reference): :func:`reinhard_transfer` of the donor placed at
    (``x``, ``y``) towards the tissue within ``ring`` px around its mask ("local"), or
    towards all tissue of the tile when that ring has fewer than ``min_ring_pixels``
    tissue pixels ("tile")."""
    window, near = local_ring(tissue, donor_mask, x, y, ring)
    if int(near.sum()) >= min_ring_pixels:
        return reinhard_transfer(donor, donor_mask, background[window], near, blend=blend), "local"
    return reinhard_transfer(donor, donor_mask, background, tissue, blend=blend), "tile"
