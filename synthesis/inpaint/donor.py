"""The donor side of steps 1–4 of context-aware inpainting: its checks, the region that is
pasted, its crop, and its turn onto the tile's nucleus orientation.

The pasted region is the vessel with whatever it encloses (a wall annotated as a ring
brings its lumen) and, with a context ring, that many px of the donor's own surroundings;
the donor is cut to that region's bounding box (:class:`DonorCrop`) before it is turned
and placed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from histosynth.synthesis.inpaint.orientation import donor_rotation, nucleus_angle, rotate_donor
from histosynth.synthesis.inpaint.seam import fill_holes

__all__ = [
    "DonorCrop",
    "bounding_box",
    "check_donor",
    "cut_donor",
    "pasted_region",
    "turn_donor",
]


@dataclass(eq=False)
class DonorCrop:
    """The donor cut to its pasted region's bounding box; every array is ``(h, w)`` px.

    ``image``: uint8 RGB; ``region``: bool, what is pasted (the seam mask before
    placement); ``vessel``: bool, the vessel alone; ``tissue``: bool, the donor's tissue
    pixels (its colour for placement scoring).
    """

    image: np.ndarray
    region: np.ndarray
    vessel: np.ndarray
    tissue: np.ndarray


def check_donor(
    background: np.ndarray | None, donor_image: np.ndarray, donor_mask: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(background, donor image, vessel mask as bool) checked: uint8 RGB images, a
    non-empty donor mask of the donor image's size; ``ValueError`` naming what is wrong.
    ``background`` ``None``: a donor prepared before it has a background."""
    background = None if background is None else np.asarray(background)
    donor_image = np.asarray(donor_image)
    for name, image in (("background", background), ("donor image", donor_image)):
        if image is None:
            continue
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"{name}: expected uint8 RGB (H, W, 3), got {image.dtype} {image.shape}"
            )
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
    return background, donor_image, vessel


def pasted_region(
    vessel: np.ndarray, *, context_ring: int, donor_exclude: np.ndarray | None
) -> np.ndarray:
    """What is pasted of the donor (bool, donor size): ``vessel`` with its holes filled,
    grown by ``context_ring`` px, less ``donor_exclude`` (non-zero) outside the vessel."""
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
    return inside


def bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """(rows, columns) slices of the smallest rectangle holding every non-zero pixel."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def cut_donor(
    donor_image: np.ndarray,
    region: np.ndarray,
    vessel: np.ndarray,
    donor_tissue: np.ndarray,
    box: tuple[slice, slice],
) -> DonorCrop:
    """The donor's arrays (all donor size) cut to ``box``, as C-contiguous arrays."""
    ys, xs = box
    return DonorCrop(
        image=np.ascontiguousarray(donor_image[ys, xs]),
        region=np.ascontiguousarray(region[ys, xs]),
        vessel=np.ascontiguousarray(vessel[ys, xs]),
        tissue=np.ascontiguousarray(donor_tissue[ys, xs]),
    )


def turn_donor(
    background: np.ndarray,
    crop: DonorCrop,
    rng: np.random.Generator,
    *,
    long_side: int,
    method: str,
) -> tuple[DonorCrop, float, float | None, float | None]:
    """(turned crop, rotation in degrees, φ donor, φ tile): the donor turned so that its
    nuclei lie as the tile's do (orientations measured at ``long_side`` px of the tile,
    the donor at the same scale; one number drawn from ``rng`` for the 180° flip). A
    turned donor that no longer fits in the tile is returned unturned, rotation 0."""
    H, W = background.shape[:2]
    scale = min(1.0, long_side / max(H, W))
    phi_target = nucleus_angle(background, scale=scale, method=method)
    phi_donor = nucleus_angle(crop.image, crop.region, scale=scale, method=method)
    rotation = donor_rotation(phi_donor, phi_target, rng)
    # the vessel mask rides along as a fourth channel (bicubic, then thresholded);
    # the donor's tissue mask is turned the same way (same mask, same canvas)
    on = np.uint8(255)
    stack = np.dstack([crop.image, crop.vessel.astype(np.uint8) * on])
    r_stack, r_mask = rotate_donor(stack, crop.region, rotation, margin=0)
    if r_mask.shape[0] > H or r_mask.shape[1] > W:
        return crop, 0.0, phi_donor, phi_target
    r_tissue, _ = rotate_donor(crop.tissue.astype(np.uint8) * on, crop.region, rotation, margin=0)
    turned = replace(
        crop,
        image=np.ascontiguousarray(r_stack[..., :3]),
        region=r_mask,
        vessel=(r_stack[..., 3] >= 128) & r_mask,
        tissue=(r_tissue >= 128) & r_mask,
    )
    return turned, rotation, phi_donor, phi_target
