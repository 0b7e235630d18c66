"""Mask adherence of one tile: how well a segmented vessel follows the tile's own mask.

Both measures compare two boolean masks of one shape (``(H, W)``, vessel = True), in the
tile's pixels:

* IoU — |A ∩ B| / |A ∪ B|; two empty masks are identical: 1.
* boundary F1 — the boundary of a mask is its pixels with a 4-neighbour outside it (the
  tile's edge counts as outside). Precision is the share of B's boundary pixels within
  ``tolerance_px`` (Euclidean, px) of A's boundary, recall the share of A's within the
  same distance of B's; F1 = 2PR / (P + R) (0 when both are 0). Two empty boundaries
  (two empty masks) give 1, one empty boundary 0.

Both are symmetric in A and B and lie in [0, 1].

Example::

    >>> import numpy as np
    >>> a = np.zeros((8, 8), bool); a[2:6, 2:6] = True
    >>> mask_iou(a, a), boundary_f1(a, a)
    (1.0, 1.0)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["BOUNDARY_TOLERANCE_PX", "boundary_f1", "mask_boundary", "mask_iou"]

BOUNDARY_TOLERANCE_PX = 2.0
"""Default boundary tolerance of :func:`boundary_f1`, in pixels of the tile."""

_FOUR = ndimage.generate_binary_structure(2, 1)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two 2-D masks of one shape, got {a.shape} and {b.shape}")
    return a, b


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    a, b = _pair(a, b)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that have a 4-neighbour outside it (outside the tile included)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, _FOUR, border_value=0)


def _within(points: np.ndarray, target: np.ndarray, tolerance_px: float) -> float:
    """Share of ``points``' pixels within ``tolerance_px`` of a pixel of ``target``."""
    distance = ndimage.distance_transform_edt(~target)
    return float(np.count_nonzero(distance[points] <= tolerance_px) / np.count_nonzero(points))


def boundary_f1(
    a: np.ndarray, b: np.ndarray, tolerance_px: float = BOUNDARY_TOLERANCE_PX
) -> float:
    """Boundary F1 of two boolean masks at ``tolerance_px`` pixels (module docstring)."""
    a, b = _pair(a, b)
    if not tolerance_px >= 0:
        raise ValueError(f"the tolerance must be ≥ 0 px, not {tolerance_px!r}")
    edge_a, edge_b = mask_boundary(a), mask_boundary(b)
    has_a, has_b = bool(edge_a.any()), bool(edge_b.any())
    if not has_a or not has_b:
        return 1.0 if has_a == has_b else 0.0
    precision = _within(edge_b, edge_a, tolerance_px)
    recall = _within(edge_a, edge_b, tolerance_px)
    total = precision + recall
    return 0.0 if total == 0 else float(2 * precision * recall / total)
