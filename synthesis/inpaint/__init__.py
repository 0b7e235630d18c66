"""Context-aware inpainting steps on numpy arrays (no torch): orientation, placement,
colour transfer, composite and seam blend (engine-facts, "Context-aware inpainting").

The diffusion part (step 5, partial denoising of the composite) lives in the inpaint
pipeline; everything before it is :func:`prepare_composite`, everything after it
:func:`seam_blend` with :func:`seam_weights`.

>>> prep = prepare_composite(tile, donor, mask, tissue=tissue, existing=annotated,
...                          seed=7)                                        # doctest: +SKIP
>>> generated = ...  # partial diffusion of prep.composite                  # doctest: +SKIP
>>> weights = seam_weights(prep.mask, sigma=15.0)                           # doctest: +SKIP
>>> final = seam_blend(prep.composite, generated, weights)                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from histosynth.synthesis import defaults
from histosynth.synthesis.inpaint.colour import lab_stats, reinhard_transfer
from histosynth.synthesis.inpaint.orientation import (
    axial_median,
    donor_rotation,
    hematoxylin,
    nucleus_angle,
    nucleus_angles,
    rotate_donor,
)
from histosynth.synthesis.inpaint.placement import Placement, find_placement, forbidden_zone
from histosynth.synthesis.inpaint.seam import (
    SEAM_CUTOFF,
    composite,
    fill_holes,
    seam_blend,
    seam_weights,
)

__all__ = [
    "SEAM_CUTOFF",
    "CompositeResult",
    "Placement",
    "axial_median",
    "composite",
    "donor_rotation",
    "find_placement",
    "forbidden_zone",
    "hematoxylin",
    "lab_stats",
    "nucleus_angle",
    "nucleus_angles",
    "prepare_composite",
    "reinhard_transfer",
    "rotate_donor",
    "seam_blend",
    "seam_weights",
]


@dataclass(eq=False)
class CompositeResult:
    """Output of :func:`prepare_composite` (steps 1–4).

    ``composite``: uint8 RGB, tile size (X); ``mask``: uint8 0/255, tile size (M′, the
    placed donor mask); ``donor_image`` / ``donor_mask``: the donor crop after rotation
    and colour transfer (mask uint8 0/255, crop size; ``mask`` is it pasted at
    ``placement``); ``rotation_deg``: rotation applied, degrees counter-clockwise as
    displayed, [0, 360); ``phi_donor`` / ``phi_target``: nucleus orientations, degrees
    [0, 180) or None; ``colour_reference``: "local" (tissue in a ring around the placed
    mask) or "tile" (all tissue of the tile); ``seed``: the seed used.
    """

    composite: np.ndarray
    mask: np.ndarray
    donor_image: np.ndarray
    donor_mask: np.ndarray
    placement: Placement
    rotation_deg: float
    phi_donor: float | None
    phi_target: float | None
    colour_reference: str = "local"
    #: the placed vessel itself (uint8 0/255, tile size): ``mask`` less the donor's own
    #: tissue ring pasted with it (equal to ``mask`` without a ring)
    vessel_mask: np.ndarray | None = None
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """JSON-ready placement record: x, y, size, rotation, orientations, penalties."""
        return {
            **self.placement.as_dict(),
            "rotation_deg": self.rotation_deg,
            "phi_donor": self.phi_donor,
            "phi_target": self.phi_target,
            "colour_reference": self.colour_reference,
            "seed": self.seed,
        }


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _local_ring(
    tissue: np.ndarray, donor_mask: np.ndarray, x: int, y: int, width: int
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Window of the tile around a placed mask and, in it, the tissue pixels within
    ``width`` px of the mask (outside it)."""
    H, W = tissue.shape
    h, w = donor_mask.shape
    y0, x0 = max(0, y - width), max(0, x - width)
    y1, x1 = min(H, y + h + width), min(W, x + w + width)
    outside = np.ones((y1 - y0, x1 - x0), dtype=np.uint8)
    outside[y - y0 : y - y0 + h, x - x0 : x - x0 + w][donor_mask] = 0
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ring = (outside > 0) & (dist <= width) & tissue[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), ring


def prepare_composite(
    background: np.ndarray,
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    *,
    existing: np.ndarray | None = None,
    tissue: np.ndarray,
    donor_tissue: np.ndarray | None = None,
    seed: int,
    colour_blend: float = defaults.COLOUR_BLEND,
    rotate: bool = True,
    existing_margin: int = 0,
    colour_ring: int = 64,
    min_ring_pixels: int = 500,
    long_side: int = 512,
    orientation_method: str = "fit_ellipse",
    context_ring: int = 0,
    donor_exclude: np.ndarray | None = None,
) -> CompositeResult | None:
    """Steps 1–4 of context-aware inpainting: orientation → rotation → placement →
    colour → composite. None when no position fits.

    ``background``: uint8 RGB tile (H, W, 3); ``donor_image``: uint8 RGB crop with
    ``donor_mask`` (same h, w; non-zero = donor; cropped to its bounding box first);
    ``existing``: (H, W) mask of existing annotations the donor must not overlap
    (dilated by ``existing_margin`` px); ``seed``: one ``np.random.Generator`` drives the
    180° flip and the placement grid, so the same inputs and seed give the same result.

    * Orientation at ``long_side`` px of the *tile* — the donor is measured at the same
      scale, so the nucleus area limits mean the same size in both. With
      ``rotate=False`` no rotation (and no orientation) is done. If the rotated donor no
      longer fits in the tile, it is used unrotated (``rotation_deg`` 0).
    * Placement: :func:`find_placement` with the existing annotations as the hard zone
      and ``tissue`` (bool (H, W): the caller's tissue mask of the background; the engine
      has no tissue rule of its own, so a run measures tissue one way in every step);
      ``donor_tissue`` (donor size, the same rule on the donor crop; ``None``: every
      donor pixel) gives the donor's colour it is scored by.
    * Colour: Reinhard (λ = ``colour_blend``) towards the tissue within ``colour_ring`` px
      around the placed mask ("local"), or the whole tile's tissue when that ring has
      fewer than ``min_ring_pixels`` tissue pixels ("tile").

    * The vessel is pasted with what it encloses (a wall annotated as a ring brings its
      lumen), and ``context_ring`` px of the donor's own surroundings (within its crop)
      with it: ``mask`` (M′, the seam) is that region, ``vessel_mask`` the vessel alone —
      its wall then lies inside the pasted tissue, where the seam blend weight is low,
      instead of on the seam. ``donor_exclude`` (donor size, non-zero = not tissue of
      this vessel, e.g. a neighbouring vessel, or crop pixels beyond the slide's edge) is
      left out of the ring.

    Raises ValueError: donor larger than the tile, empty donor mask (before or after
    rotation), no tissue in the background, mismatched shapes.
    """
    background = np.asarray(background)
    donor_image = np.asarray(donor_image)
    for name, image in (("background", background), ("donor image", donor_image)):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"{name}: expected uint8 RGB (H, W, 3), got {image.dtype} {image.shape}"
            )
    H, W = background.shape[:2]
    mask = np.asarray(donor_mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.shape != donor_image.shape[:2]:
        raise ValueError(
            f"donor mask {mask.shape} does not match the donor image {donor_image.shape[:2]}"
        )
    vessel = mask if mask.dtype == bool else mask != 0
    if not vessel.any():
        raise ValueError("donor mask is empty")
    # the pasted region holds the vessel with whatever it encloses: a wall annotated as a
    # ring (its lumen a hole) is pasted with its lumen, not with background in it
    inside = fill_holes(vessel)
    if context_ring > 0:
        disc = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * context_ring + 1, 2 * context_ring + 1)
        )
        # the whole ring, pale gaps included: holes in it would put seams next to the wall
        inside = cv2.dilate(inside.astype(np.uint8), disc) > 0
        if donor_exclude is not None:
            exclude = np.asarray(donor_exclude)
            if exclude.shape != vessel.shape:
                raise ValueError(
                    f"donor_exclude {exclude.shape} does not match the donor {vessel.shape}"
                )
            inside &= fill_holes(vessel) | (exclude == 0)
    ys, xs = _bbox(inside)
    donor_c, inside_c, vessel_c = donor_image[ys, xs], inside[ys, xs], vessel[ys, xs]
    h, w = inside_c.shape
    if h > H or w > W:
        raise ValueError(f"donor ({h}×{w} px) is larger than the background tile ({H}×{W} px)")
    tissue = np.asarray(tissue, dtype=bool)
    if tissue.shape != (H, W):
        raise ValueError(f"tissue mask {tissue.shape} does not match the tile {(H, W)}")
    if donor_tissue is None:
        donor_tissue = np.ones(vessel.shape, dtype=bool)
    donor_tissue = np.asarray(donor_tissue, dtype=bool)
    if donor_tissue.shape != vessel.shape:
        raise ValueError(
            f"donor tissue {donor_tissue.shape} does not match the donor {vessel.shape}"
        )
    tissue_c = donor_tissue[ys, xs]
    if not tissue.any():
        raise ValueError("background has no tissue")
    if existing is not None and np.asarray(existing).shape[:2] != (H, W):
        raise ValueError(
            f"existing annotations {np.asarray(existing).shape} do not match the tile {(H, W)}"
        )

    rng = np.random.default_rng(seed)
    phi_donor = phi_target = None
    rotation = 0.0
    d_img, d_mask = np.ascontiguousarray(donor_c), np.ascontiguousarray(inside_c)
    d_vessel, d_tissue = np.ascontiguousarray(vessel_c), np.ascontiguousarray(tissue_c)
    if rotate:
        scale = min(1.0, long_side / max(H, W))
        phi_target = nucleus_angle(background, scale=scale, method=orientation_method)
        phi_donor = nucleus_angle(donor_c, inside_c, scale=scale, method=orientation_method)
        rotation = donor_rotation(phi_donor, phi_target, rng)
        # the vessel mask rides along as a fourth channel (bicubic, then thresholded);
        # the donor's tissue mask is turned the same way (same mask, same canvas)
        on = np.uint8(255)
        stack = np.dstack([donor_c, vessel_c.astype(np.uint8) * on])
        r_stack, r_mask = rotate_donor(stack, inside_c, rotation, margin=0)
        if r_mask.shape[0] <= H and r_mask.shape[1] <= W:
            r_tissue, _ = rotate_donor(tissue_c.astype(np.uint8) * on, inside_c, rotation, margin=0)
            d_img, d_mask = np.ascontiguousarray(r_stack[..., :3]), r_mask
            d_vessel = (r_stack[..., 3] >= 128) & r_mask
            d_tissue = (r_tissue >= 128) & r_mask
        else:
            rotation = 0.0

    if existing is None:
        forbidden = np.zeros((H, W), dtype=bool)
    else:
        forbidden = forbidden_zone(background, existing, margin=existing_margin)
    placement = find_placement(
        background, d_img, d_mask, forbidden, rng=rng, tissue=tissue, donor_tissue=d_tissue
    )
    if placement is None:
        return None

    window, ring = _local_ring(tissue, d_mask, placement.x, placement.y, colour_ring)
    if int(ring.sum()) >= min_ring_pixels:
        reference = "local"
        d_img = reinhard_transfer(d_img, d_mask, background[window], ring, blend=colour_blend)
    else:
        reference = "tile"
        d_img = reinhard_transfer(d_img, d_mask, background, tissue, blend=colour_blend)

    x_img, placed = composite(background, d_img, d_mask, placement.x, placement.y)
    placed_vessel = np.zeros((H, W), dtype=np.uint8)
    vh, vw = d_vessel.shape
    placed_vessel[placement.y : placement.y + vh, placement.x : placement.x + vw] = d_vessel.astype(
        np.uint8
    ) * np.uint8(255)
    return CompositeResult(
        composite=x_img,
        mask=placed,
        donor_image=d_img,
        donor_mask=d_mask.astype(np.uint8) * np.uint8(255),
        placement=placement,
        rotation_deg=float(rotation),
        phi_donor=phi_donor,
        phi_target=phi_target,
        colour_reference=reference,
        seed=int(seed),
        vessel_mask=placed_vessel,
    )
