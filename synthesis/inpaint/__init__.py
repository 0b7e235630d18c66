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

import numpy as np

from histosynth.synthesis import defaults
from histosynth.synthesis.inpaint.colour import lab_stats, match_surroundings, reinhard_transfer
from histosynth.synthesis.inpaint.donor import (
    bounding_box,
    check_donor,
    cut_donor,
    pasted_region,
    turn_donor,
)
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
    seam_blend,
    seam_weights,
)

# importable from here before donor.py took over its use
from histosynth.synthesis.inpaint.seam import fill_holes as fill_holes

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
    background, donor_image, vessel = check_donor(background, donor_image, donor_mask)
    H, W = background.shape[:2]
    region = pasted_region(vessel, context_ring=context_ring, donor_exclude=donor_exclude)
    box = bounding_box(region)
    h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
    if h > H or w > W:
        raise ValueError(f"donor ({h}×{w} px) is larger than the background tile ({H}×{W} px)")
    tissue, donor_tissue = _check_tissue(tissue, donor_tissue, existing, (H, W), vessel.shape)
    crop = cut_donor(donor_image, region, vessel, donor_tissue, box)

    rng = np.random.default_rng(seed)
    phi_donor = phi_target = None
    rotation = 0.0
    if rotate:
        crop, rotation, phi_donor, phi_target = turn_donor(
            background, crop, rng, long_side=long_side, method=orientation_method
        )
    if existing is None:
        forbidden = np.zeros((H, W), dtype=bool)
    else:
        forbidden = forbidden_zone(background, existing, margin=existing_margin)
    placement = find_placement(
        background, crop.image, crop.region, forbidden, rng=rng, tissue=tissue,
        donor_tissue=crop.tissue,
    )
    if placement is None:
        return None
    x, y = placement.x, placement.y
    d_img, reference = match_surroundings(
        crop.image, crop.region, background, tissue, x, y,
        ring=colour_ring, min_ring_pixels=min_ring_pixels, blend=colour_blend,
    )
    x_img, placed = composite(background, d_img, crop.region, x, y)
    placed_vessel = np.zeros((H, W), dtype=np.uint8)
    vh, vw = crop.vessel.shape
    placed_vessel[y : y + vh, x : x + vw] = crop.vessel.astype(np.uint8) * np.uint8(255)
    return CompositeResult(
        composite=x_img,
        mask=placed,
        donor_image=d_img,
        donor_mask=crop.region.astype(np.uint8) * np.uint8(255),
        placement=placement,
        rotation_deg=float(rotation),
        phi_donor=phi_donor,
        phi_target=phi_target,
        colour_reference=reference,
        seed=int(seed),
        vessel_mask=placed_vessel,
    )


def _check_tissue(
    tissue: np.ndarray,
    donor_tissue: np.ndarray | None,
    existing: np.ndarray | None,
    tile: tuple[int, int],
    donor: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, donor tissue) as bool masks of the ``tile`` and ``donor`` shapes (donor
    tissue ``None``: every donor pixel); the tile must have tissue and ``existing``
    annotations the tile's shape, else ``ValueError``."""
    tissue = np.asarray(tissue, dtype=bool)
    if tissue.shape != tile:
        raise ValueError(f"tissue mask {tissue.shape} does not match the tile {tile}")
    if donor_tissue is None:
        donor_tissue = np.ones(donor, dtype=bool)
    donor_tissue = np.asarray(donor_tissue, dtype=bool)
    if donor_tissue.shape != donor:
        raise ValueError(f"donor tissue {donor_tissue.shape} does not match the donor {donor}")
    if not tissue.any():
        raise ValueError("background has no tissue")
    if existing is not None and np.asarray(existing).shape[:2] != tile:
        raise ValueError(
            f"existing annotations {np.asarray(existing).shape} do not match the tile {tile}"
        )
    return tissue, donor_tissue
