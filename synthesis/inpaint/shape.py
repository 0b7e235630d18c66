"""Shape-guided vessels, steps 1–4: a donor warped into a target outline, coloured like
its new surroundings and pasted with its tissue ring (numpy, no torch).

Step 5 is the inpaint pipeline's masked partial diffusion (``inside`` = the target
outline at ``inside_strength``, the seam band at τ, nothing beyond); the result's
``vessel_mask`` is the target outline itself, which the tile's mask is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histosynth.synthesis import defaults
from histosynth.synthesis.inpaint import CompositeResult
from histosynth.synthesis.inpaint._checks import check_rgb
from histosynth.synthesis.inpaint.colour import match_surroundings
from histosynth.synthesis.inpaint.donor import check_donor, pasted_region
from histosynth.synthesis.inpaint.placement import Placement, find_placement, forbidden_zone
from histosynth.synthesis.inpaint.seam import composite, fill_holes
from histosynth.synthesis.inpaint.warp import warp_donor

__all__ = [
    "ShapeCrop",
    "donor_outline",
    "prepare_shape_composite",
    "target_frame",
    "warp_into_target",
]


def donor_outline(vessel: np.ndarray) -> np.ndarray:
    """The outer outline ((n, 2) px, not closed) of the largest part of a vessel mask."""
    contours, _ = cv2.findContours(
        (np.asarray(vessel) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    if not contours:
        raise ValueError("the donor mask is empty")
    largest = max(contours, key=cv2.contourArea)
    points = largest[:, 0, :].astype(float) + 0.5  # pixel centres
    if len(points) < 3:
        raise ValueError("the donor's outline has fewer than 3 points")
    return points


def target_frame(outline: np.ndarray, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``outline`` moved into a frame with ``margin`` px free on every side: (the moved
    outline, the frame's (H, W))."""
    low = outline.min(axis=0)
    moved = outline - low + margin
    width, height = np.ceil(outline.max(axis=0) - low + 2 * margin).astype(int) + 1
    return moved, (int(height), int(width))


def _grow(mask: np.ndarray, ring: int) -> np.ndarray:
    if ring <= 0:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
    return cv2.dilate(mask.astype(np.uint8), disc) > 0


@dataclass(eq=False)
class ShapeCrop:
    """A donor warped into a target outline, in the target's frame: ``image`` uint8 RGB,
    ``pasted`` (bool) the outline grown by the tissue ring where the warp brought donor
    pixels, ``target`` (bool) the outline's mask (holes filled)."""

    image: np.ndarray
    pasted: np.ndarray
    target: np.ndarray


def warp_into_target(
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    target_outline: np.ndarray,
    target_mask: np.ndarray,
    *,
    context_ring: int = 0,
    donor_exclude: np.ndarray | None = None,
) -> ShapeCrop:
    """The donor (``donor_image`` uint8 RGB, ``donor_mask`` its vessel) warped so that its
    outline lands on ``target_outline`` ((n, 2) px of ``target_mask``'s frame; the mask:
    non-zero inside it), with ``context_ring`` px of its own tissue kept around it (less
    ``donor_exclude``). Independent of the background: warp once, place anywhere.

    Raises ValueError: an empty donor or target.
    """
    _, donor_image, vessel = check_donor(None, donor_image, donor_mask)
    target = np.asarray(target_mask) > 0
    if not target.any():
        raise ValueError("the target outline covers no pixel")
    region = pasted_region(vessel, context_ring=context_ring, donor_exclude=donor_exclude)
    warped = warp_donor(
        donor_image, region, donor_outline(vessel), target_outline, target.shape,
        ring=float(context_ring),
    )
    target = fill_holes(target)
    return ShapeCrop(warped.image, _grow(target, context_ring) & (warped.region | target), target)


def prepare_shape_composite(
    background: np.ndarray,
    crop: ShapeCrop,
    *,
    tissue: np.ndarray,
    existing: np.ndarray | None = None,
    seed: int,
    place: bool,
    colour_blend: float = defaults.COLOUR_BLEND,
    colour_ring: int = 64,
    min_ring_pixels: int = 500,
) -> CompositeResult | None:
    """The warped donor ``crop`` (:func:`warp_into_target`) recoloured towards the tissue
    around it and pasted onto ``background``.

    ``place=False``: the crop's frame is the tile (a drawn sketch, already where it goes);
    ``place=True``: the crop is placed where it fits best
    (:func:`~histosynth.synthesis.inpaint.placement.find_placement`, away from
    ``existing`` annotations, on ``tissue``; seeded by ``seed``) — ``None`` when nowhere.
    ``vessel_mask`` of the result is the target outline's mask in tile px; ``mask`` (M′)
    the pasted region.

    Raises ValueError: a frame that is not the tile (``place=False``) or is larger.
    """
    background = check_rgb(background, "background")
    height, width = background.shape[:2]
    target, pasted = crop.target, crop.pasted
    if not place and target.shape != (height, width):
        raise ValueError(f"target mask {target.shape} does not match the tile {(height, width)}")
    if target.shape[0] > height or target.shape[1] > width:
        raise ValueError(f"the target's frame {target.shape} is larger than the tile")
    rng = np.random.default_rng(seed)
    tissue = np.asarray(tissue, dtype=bool)
    if place:
        forbidden = (
            np.zeros((height, width), bool) if existing is None
            else forbidden_zone(background, existing)
        )
        placement = find_placement(
            background, crop.image, pasted, forbidden, rng=rng, tissue=tissue
        )
        if placement is None:
            return None
    else:
        placement = Placement(0, 0, 0.0, 0.0, float(tissue[pasted].mean()), 0.0, width, height)
    x, y = placement.x, placement.y
    recoloured, reference = match_surroundings(
        crop.image, pasted, background, tissue, x, y,
        ring=colour_ring, min_ring_pixels=min_ring_pixels, blend=colour_blend,
    )
    tile, placed = composite(background, recoloured, pasted, x, y)
    vessel_tile = np.zeros((height, width), np.uint8)
    th, tw = target.shape
    vessel_tile[y : y + th, x : x + tw] = target.astype(np.uint8) * np.uint8(255)
    return CompositeResult(
        composite=tile,
        mask=placed,
        donor_image=recoloured,
        donor_mask=pasted.astype(np.uint8) * np.uint8(255),
        placement=placement,
        rotation_deg=0.0,
        phi_donor=None,
        phi_target=None,
        colour_reference=reference,
        vessel_mask=vessel_tile,
        seed=int(seed),
    )
