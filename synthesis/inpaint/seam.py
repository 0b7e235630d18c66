"""Steps 4 and 6 of context-aware inpainting: the hard composite and the seam blend.

* ``composite``: X = (1 − M′)·T + M′·D′ with a binary placed mask M′ (a pixel copy).
* ``seam_weights``: A = exp(−d_out²/2σ²)·exp(−d_in²/2σ²), A ← A / max A, where d_in is
  the Euclidean distance of a mask pixel to the nearest outside pixel and d_out that of
  an outside pixel to the nearest mask pixel (one of the two is 0 at every pixel, so A
  only depends on d = d_in + d_out, the distance to the seam). The tile border is not a
  seam. A is then set to exactly 0 wherever d > 4σ (where A < e⁻⁸ ≈ 3·10⁻⁴, less than
  0.09 grey levels), so that far from the seam the blend returns X bit for bit.
* ``seam_blend``: X_final = (1 − A)·X + A·X_gen, rounded to uint8; exactly X where A = 0.

>>> X, M = composite(tile, donor, donor_mask, x, y)  # doctest: +SKIP
>>> final = seam_blend(X, generated, seam_weights(M, sigma=15.0))  # doctest: +SKIP
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from histosynth.synthesis import defaults

__all__ = ["SEAM_CUTOFF", "composite", "fill_holes", "seam_blend", "seam_weights"]

#: Weights are zeroed beyond this many σ from the seam.
SEAM_CUTOFF = 4.0


def as_mask2d(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask, got shape {mask.shape}")
    return mask if mask.dtype == bool else mask != 0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool (H, W)) with its holes filled: every background pixel that no
    4-connected path of background pixels joins to the border becomes True."""
    inside = np.asarray(mask, dtype=bool)
    padded = np.pad(~inside, 1, constant_values=True).astype(np.uint8)
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2, flags=4)
    return inside | (padded[1:-1, 1:-1] == 1)


def _bounding_rect(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the non-zero pixels of a bool mask; w = h = 0 when empty."""
    return tuple(int(v) for v in cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8)))


def composite(
    background: np.ndarray, donor_image: np.ndarray, donor_mask: np.ndarray, x: int, y: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paste the donor's mask pixels onto a copy of ``background`` with the crop's top-left
    at (x, y) px. Returns (X uint8 (H, W, C), M′ uint8 (H, W) 0/255). The crop must lie
    inside the tile (ValueError otherwise)."""
    background = np.asarray(background)
    donor_image = np.asarray(donor_image)
    if background.dtype != np.uint8 or donor_image.dtype != np.uint8:
        raise ValueError("background and donor image must be uint8")
    if background.ndim != 3 or donor_image.ndim != 3 or background.shape[2] != donor_image.shape[2]:
        raise ValueError(
            f"background {background.shape} and donor {donor_image.shape} must both be "
            "(H, W, C) with the same C"
        )
    inside = as_mask2d(donor_mask, "donor mask")
    h, w = inside.shape
    H, W = background.shape[:2]
    if donor_image.shape[:2] != (h, w):
        raise ValueError(f"donor image {donor_image.shape[:2]} and mask {(h, w)} differ in size")
    x, y = int(x), int(y)
    if x < 0 or y < 0 or x + w > W or y + h > H:
        raise ValueError(f"donor crop {w}×{h} at ({x}, {y}) leaves the {W}×{H} tile")
    out = background.copy()
    np.copyto(out[y : y + h, x : x + w], donor_image, where=inside[..., None])
    placed = np.zeros((H, W), dtype=np.uint8)
    placed[y : y + h, x : x + w] = inside.view(np.uint8) * np.uint8(255)
    return out, placed


def seam_weights(mask: np.ndarray, sigma: float = defaults.SEAM_SIGMA) -> np.ndarray:
    """Seam blending weights A (float32, mask size, in [0, 1], max 1) for a placed mask
    (non-zero = donor): Gaussian in the distance to the seam with ``sigma`` px, exactly 0
    beyond 4σ. All zeros when the mask is empty or covers the whole tile (no seam).

    Only the mask's bounding box grown by 4σ + 1 px is transformed (outside it A is 0).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    inside = as_mask2d(mask, "mask")
    H, W = inside.shape
    weights = np.zeros((H, W), dtype=np.float32)
    bx, by, bw, bh = _bounding_rect(inside)
    if bw == 0:
        return weights
    reach = math.ceil(SEAM_CUTOFF * sigma) + 1
    y0, y1 = max(0, by - reach), min(H, by + bh + reach)
    x0, x1 = max(0, bx - reach), min(W, bx + bw + reach)
    m8 = inside[y0:y1, x0:x1].view(np.uint8)
    if cv2.countNonZero(m8) == m8.size:
        return weights  # no outside pixel: no seam
    # distance of each non-zero pixel to the nearest zero pixel; the image border is not
    # a zero pixel (OpenCV), so cropping at the tile border does not create a seam there
    d = cv2.distanceTransform(1 - m8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # d_out
    # d_in only needs the mask's box plus a 1 px ring of outside pixels (the nearest
    # outside pixel of an inside pixel is never beyond that ring)
    iy0, iy1 = max(y0, by - 1), min(y1, by + bh + 1)
    ix0, ix1 = max(x0, bx - 1), min(x1, bx + bw + 1)
    inner = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    d[inner] += cv2.distanceTransform(m8[inner], cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # d = d_in + d_out: one of the two is 0 at every pixel
    a = np.exp(d * d * np.float32(-0.5 / (sigma * sigma)))
    peak = float(a.max())
    if peak > 0:
        a /= np.float32(peak)
    # compared in float64: a float32 cut-off could round 4σ up onto a pixel's distance
    a[d > np.float64(SEAM_CUTOFF * sigma)] = 0.0
    weights[y0:y1, x0:x1] = a
    return weights


def seam_blend(composite: np.ndarray, generated: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(1 − A)·X + A·X_gen, rounded to the nearest integer (ties to even), as uint8; pixels
    where A == 0 are copied from ``composite`` unchanged (A is clipped to [0, 1]).
    ``composite`` and ``generated``: uint8 (H, W, C) of one shape; ``weights``: (H, W)
    in [0, 1] (e.g. :func:`seam_weights`)."""
    composite = np.asarray(composite)
    generated = np.asarray(generated)
    if composite.dtype != np.uint8 or generated.dtype != np.uint8:
        raise ValueError(
            f"composite and generated must be uint8, got {composite.dtype} and {generated.dtype}"
        )
    if composite.shape != generated.shape:
        raise ValueError(f"composite {composite.shape} and generated {generated.shape} differ")
    a = np.asarray(weights, dtype=np.float32)
    if a.shape != composite.shape[:2]:
        raise ValueError(f"weights {a.shape} do not match the image {composite.shape[:2]}")
    out = composite.copy()
    active = a != 0
    bx, by, bw, bh = _bounding_rect(active)
    if bw == 0:
        return out
    ys, xs = slice(by, by + bh), slice(bx, bx + bw)
    aw = a[ys, xs]
    if not np.isfinite(aw).all():
        raise ValueError("weights must be finite")
    aw = np.clip(aw, 0.0, 1.0)
    x = np.ascontiguousarray(composite[ys, xs])
    channels = x.shape[2] if x.ndim == 3 else 1
    if channels > 1:
        aw = cv2.merge([aw] * channels)
    xf = x.astype(np.float32)
    # x + A·(g − x) = (1 − A)·x + A·g; float32 is exact to ≈1e-4 grey levels, and exactly
    # x where A = 0
    blended = cv2.multiply(np.subtract(generated[ys, xs], xf, dtype=np.float32), aw)
    blended += xf
    # rounded half to even (cvRound) and saturated; the values are already in [0, 255]
    blended = cv2.convertScaleAbs(blended).reshape(x.shape)
    # and copy X where A == 0, so that those pixels are X by construction
    cv2.copyTo(x, np.ascontiguousarray(~active[ys, xs]).view(np.uint8), blended)
    out[ys, xs] = blended
    return out
