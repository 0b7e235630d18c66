"""Argument checks shared by the inpainting steps (``ValueError`` with the argument name)."""

from __future__ import annotations

import numpy as np


def check_rgb(rgb: np.ndarray, name: str) -> np.ndarray:
    """``rgb`` as a uint8 ``(H, W, 3)`` array with pixels, else ``ValueError`` naming it."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{name}: image has no pixels")
    return rgb


def check_mask(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """A 2-D mask of ``shape`` as bool (non-zero = inside), else ``ValueError`` naming it."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise ValueError(f"{name}: mask shape {mask.shape} does not match the image {shape}")
    return mask if mask.dtype == bool else mask != 0
