"""Step 2 of context-aware inpainting: where on the background tile to put the donor.

Rules (engine-facts "Context-aware inpainting", reconciled):

* **Hard** — the donor crop's rectangle stays inside the tile, and no pixel of the placed
  donor *mask* lies on a ``forbidden`` pixel. Pass the existing annotations there
  (``forbidden_zone(tile, existing)``); passing the tissue too
  (``forbidden_zone(tile, existing, tissue=tissue)``, which also marks non-tissue)
  forbids any non-tissue pixel under the mask as well — a stricter mode.
* **Scored** — the tissue fraction (share of the placed mask's pixels on ``tissue``, the
  caller's tissue mask: the engine has no tissue rule of its own, so that a run measures
  tissue one way in every step): below ``min_tissue`` [0.5] rejected, from
  ``preferred_tissue`` [0.9] up no penalty; the distance of the crop rectangle from the
  tile border (no penalty beyond ``edge_margin`` px); the colour difference (CIELAB ΔE
  between the mean of the donor's tissue pixels, ``donor_tissue``, and the mean of the
  background's tissue pixels in a ring of ``ring`` px around the placed mask).
  ``penalty = w_e·edge + w_t·tissue + w_c·colour``, each term in [0, 1] (colour:
  ΔE / ``colour_scale``, unbounded); the lowest wins.

Speed: all grid positions are scored at once by correlating downscaled maps with the
downscaled donor mask (``cv2.filter2D``, DFT for large kernels) at ≤ ``max_side`` px
(1024² tile → 128², 8 px blocks; tiles up to 128 px are searched at full resolution).
Forbidden pixels and the mask are both max-pooled, so the coarse overlap test is
conservative (it never passes an overlap, and may give up positions within one block of
a forbidden pixel); the winner is re-checked and measured exactly at full resolution, and
the next best is taken if its exact tissue fraction falls below ``min_tissue``. The
ranking uses the coarse measures; the returned record holds the exact ones.

>>> forbidden = forbidden_zone(tile, existing)  # doctest: +SKIP
>>> rng = np.random.default_rng(0)
>>> p = find_placement(tile, donor, donor_mask, forbidden, rng=rng, tissue=tissue)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from histosynth.synthesis.inpaint._checks import check_mask as _check_mask
from histosynth.synthesis.inpaint._checks import check_rgb as _check_rgb
from histosynth.synthesis.inpaint.colour import masked_mean_std, to_lab

__all__ = ["Placement", "find_placement", "forbidden_zone"]


@dataclass(frozen=True)
class Placement:
    """Where the donor crop goes: (x, y) = its top-left corner in background pixels.

    ``penalty``: the score that chose it (lower is better); ``edge_distance``: px from the
    crop rectangle to the nearest tile border; ``tissue_fraction``: share [0, 1] of the
    placed mask's pixels on tissue; ``colour_difference``: CIELAB ΔE between donor tissue
    and the background ring around the mask; ``width`` / ``height``: donor crop size, px.
    """

    x: int
    y: int
    penalty: float
    edge_distance: float
    tissue_fraction: float
    colour_difference: float
    width: int = 0
    height: int = 0

    @property
    def centre(self) -> tuple[float, float]:
        """Centre (x, y) of the donor crop in background pixels."""
        return (self.x + self.width / 2.0, self.y + self.height / 2.0)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready record (ints and floats)."""
        return asdict(self)


def forbidden_zone(
    background: np.ndarray,
    existing: np.ndarray | None = None,
    *,
    tissue: np.ndarray | None = None,
    margin: int = 0,
) -> np.ndarray:
    """Pixels (bool, background size) where a synthetic vessel should not go: the
    ``existing`` annotation mask (non-zero = annotated) dilated by ``margin`` px
    (Euclidean disc), OR non-tissue (not ``tissue``, the caller's tissue mask) when
    ``tissue`` is given."""
    background = _check_rgb(background, "background")
    shape = background.shape[:2]
    zone = (
        np.zeros(shape, dtype=bool) if tissue is None else ~_check_mask(tissue, shape, "tissue")
    )
    if existing is not None:
        ann = _check_mask(existing, shape, "existing annotations")
        if margin > 0 and ann.any():
            disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
            ann = cv2.dilate(ann.astype(np.uint8), disc) > 0
        zone |= ann
    return zone


# ----------------------------------------------------------------------------- helpers


def _u8(mask: np.ndarray) -> np.ndarray:
    """A bool (or non-zero) mask as uint8 0/255."""
    flags = mask if mask.dtype == bool else mask != 0
    return np.ascontiguousarray(flags).view(np.uint8) * np.uint8(255)


def _pool(mask: np.ndarray, f: int, shape: tuple[int, int], *, fill: float, how: str) -> np.ndarray:
    """Block-pool a bool map by ``f`` after padding it to ``shape`` × f with ``fill`` (0 or
    1): ``how="max"`` (any, bool) or ``"mean"`` (fraction, float32). Area resampling by an
    integer factor is the block mean; "any" is mean > 0 (uint8 0/255 data while one pixel
    in a block still averages to ≥ 1, i.e. f ≤ 15; float32 beyond)."""
    hc, wc = shape
    if f <= 15:
        src, top = _u8(mask), 255.0
    else:
        src, top = mask.astype(np.float32), 1.0
    pad_y, pad_x = hc * f - src.shape[0], wc * f - src.shape[1]
    if pad_y or pad_x:
        src = cv2.copyMakeBorder(src, 0, pad_y, 0, pad_x, cv2.BORDER_CONSTANT, value=fill * top)
    pooled = src if f == 1 else cv2.resize(src, (wc, hc), interpolation=cv2.INTER_AREA)
    if how == "max":
        return pooled > 0
    return pooled.astype(np.float32) * np.float32(1.0 / top)


def _correlate(image: np.ndarray, kernel: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Valid cross-correlation Σ kernel[a, b]·image[j + a, i + b] for j, i < out_shape."""
    out = cv2.filter2D(
        np.ascontiguousarray(image, dtype=np.float32),
        cv2.CV_32F,
        np.ascontiguousarray(kernel, dtype=np.float32),
        anchor=(0, 0),
        borderType=cv2.BORDER_CONSTANT,
    )
    return out[: out_shape[0], : out_shape[1]]


def _ring(mask: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """Pixels within ``width`` px (Euclidean) of ``mask`` but outside it, on a canvas
    padded by ``width`` on every side: (ring, pad)."""
    outside = cv2.copyMakeBorder(
        (~mask).astype(np.uint8), width, width, width, width, cv2.BORDER_CONSTANT, value=1
    )
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (outside > 0) & (dist <= width), width


def _grid(image: np.ndarray, mask: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Every k-th row and column of ``image`` and ``mask`` so that about ``limit`` or fewer
    mask pixels remain (deterministic); unchanged when that leaves too few (< 256)."""
    count = int(np.count_nonzero(mask))
    step = max(1, math.ceil(math.sqrt(count / limit)))
    if step > 1 and np.count_nonzero(mask[::step, ::step]) >= 256:
        return image[::step, ::step], mask[::step, ::step]
    return image, mask


def _donor_colour(
    donor_image: np.ndarray, donor_mask: np.ndarray, donor_tissue: np.ndarray | None
) -> np.ndarray:
    """Mean CIELAB of the donor's tissue pixels under the mask (all mask pixels when
    ``donor_tissue`` is None or holds none of them), from about 16384 pixels on a
    regular grid."""
    if donor_tissue is not None:
        tissue = donor_mask & donor_tissue
        if tissue.any():
            donor_mask = tissue
    image, mask = _grid(donor_image, donor_mask, 16384)
    return masked_mean_std(to_lab(np.ascontiguousarray(image)), mask)[0]


def _ring_colour_difference(
    tissue: np.ndarray,
    background: np.ndarray,
    ring_mask: np.ndarray,
    pad: int,
    donor_lab: np.ndarray,
    x: int,
    y: int,
    colour_scale: float,
) -> float:
    """Exact CIELAB ΔE between the donor's mean and the mean of the tile's tissue pixels
    in ``ring_mask`` (from :func:`_ring`) placed with the crop at (x, y);
    ``colour_scale`` when the ring holds no tissue."""
    H, W = tissue.shape
    # the ring's window on the tile, clipped at the tile border
    y0, x0 = y - pad, x - pad
    cy0, cx0 = max(0, y0), max(0, x0)
    cy1, cx1 = min(H, y0 + ring_mask.shape[0]), min(W, x0 + ring_mask.shape[1])
    window = ring_mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    window = window & tissue[cy0:cy1, cx0:cx1]
    if not window.any():
        return colour_scale
    image, window = _grid(background[cy0:cy1, cx0:cx1], window, 16384)
    ring_lab = masked_mean_std(to_lab(image), window)[0]
    return float(np.linalg.norm(ring_lab - donor_lab))


def _coarse_colour_difference(
    background: np.ndarray,
    tissue_c: np.ndarray,
    mask_any: np.ndarray,
    donor_lab: np.ndarray,
    f: int,
    *,
    ring: int,
    colour_scale: float,
    out_shape: tuple[int, int],
) -> np.ndarray:
    """CIELAB ΔE between ``donor_lab`` and the tile's tissue around the placed mask, for
    every coarse position (``f`` px blocks; ``colour_scale`` where the ring holds no
    tissue): tissue-weighted block means of the background, summed over the ring."""
    H, W = background.shape[:2]
    Hc, Wc = tissue_c.shape
    rc = max(1, round(ring / f))
    ring_c, _ = _ring(mask_any, rc)
    # (block means over all pixels: in partly non-tissue blocks the colour is paler, but
    # those blocks weigh by their tissue share; the winner is measured exactly)
    pad_y, pad_x = Hc * f - H, Wc * f - W
    rgb = background
    if pad_y or pad_x:
        rgb = cv2.copyMakeBorder(rgb, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
    block_rgb = rgb if f == 1 else cv2.resize(rgb, (Wc, Hc), interpolation=cv2.INTER_AREA)
    block_lab = to_lab(block_rgb)
    stack = np.concatenate([tissue_c[..., None], block_lab * tissue_c[..., None]], axis=2)
    stack = cv2.copyMakeBorder(stack, rc, rc, rc, rc, cv2.BORDER_CONSTANT, value=0)
    ring_sums = _correlate(stack, ring_c.astype(np.float32), out_shape)
    ring_t = ring_sums[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ring_mean = ring_sums[..., 1:] / ring_t[..., None]
    colour = np.linalg.norm(ring_mean - donor_lab, axis=2)
    return np.where(ring_t > 1e-3, colour, colour_scale)


def _grid_positions(
    rng: np.random.Generator, step_c: int, out_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the candidate grid in coarse units: every ``step_c``-th
    position of ``out_shape``, the offset drawn from ``rng`` (two integers, y then x)."""
    jmax, imax = out_shape[0] - 1, out_shape[1] - 1
    off_y = int(rng.integers(0, step_c)) % (jmax + 1)
    off_x = int(rng.integers(0, step_c)) % (imax + 1)
    js = np.arange(off_y, jmax + 1, step_c)
    is_ = np.arange(off_x, imax + 1, step_c)
    jj, ii = np.meshgrid(js, is_, indexing="ij")
    return jj.ravel(), ii.ravel()


def find_placement(
    background: np.ndarray,
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    forbidden: np.ndarray,
    *,
    rng: np.random.Generator,
    grid_step: int | None = None,
    min_tissue: float = 0.5,
    preferred_tissue: float = 0.9,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    tissue: np.ndarray,
    donor_tissue: np.ndarray | None = None,
    edge_margin: float = 64.0,
    colour_scale: float = 20.0,
    ring: int = 16,
    max_side: int = 128,
) -> Placement | None:
    """Best top-left (x, y) for the donor crop on ``background``, or None if nothing fits.

    ``background``: uint8 RGB tile (H, W, 3); ``donor_image`` / ``donor_mask``: the
    (rotated) crop and its mask (non-zero = donor), same (h, w); ``forbidden``: (H, W)
    hard zone for the donor mask (see the module docstring); ``tissue``: (H, W) tissue
    map of the background (non-zero = tissue); ``donor_tissue``: (h, w) tissue map of the
    donor crop, whose pixels under the mask give its colour (``None``: every mask
    pixel). Candidates lie on a grid of ``grid_step`` px
    (default ≈ tile side / 32, a multiple of the analysis block) whose offset is drawn
    from ``rng`` — variety between seeds, the same result for the same seed. ``weights``
    = (edge, tissue, colour). Raises ValueError when the donor is larger than the tile or
    its mask is empty.
    """
    background = _check_rgb(background, "background")
    donor_image = _check_rgb(donor_image, "donor image")
    H, W = background.shape[:2]
    mask = _check_mask(donor_mask, donor_image.shape[:2], "donor mask")
    h, w = mask.shape
    if h > H or w > W:
        raise ValueError(f"donor ({h}×{w} px) is larger than the background tile ({H}×{W} px)")
    if not mask.any():
        raise ValueError("donor mask is empty")
    hard = _check_mask(forbidden, (H, W), "forbidden zone")
    tissue = _check_mask(tissue, (H, W), "tissue mask")
    if donor_tissue is not None:
        donor_tissue = _check_mask(donor_tissue, (h, w), "donor tissue")
    if not 0 <= min_tissue <= preferred_tissue <= 1:
        raise ValueError("need 0 ≤ min_tissue ≤ preferred_tissue ≤ 1")
    w_edge, w_tissue, w_colour = (float(v) for v in weights)

    # ---- coarse maps (f px blocks)
    f = max(1, math.ceil(max(H, W) / max_side))
    Hc, Wc = math.ceil(H / f), math.ceil(W / f)
    hc, wc = math.ceil(h / f), math.ceil(w / f)
    hard_c = _pool(hard, f, (Hc, Wc), fill=1.0, how="max")
    tissue_c = _pool(tissue, f, (Hc, Wc), fill=0.0, how="mean")
    mask_any = _pool(mask, f, (hc, wc), fill=0.0, how="max")
    mask_frac = _pool(mask, f, (hc, wc), fill=0.0, how="mean")
    jmax, imax = (H - h) // f, (W - w) // f  # footprint inside the tile
    out_shape = (jmax + 1, imax + 1)

    overlap = _correlate(hard_c.astype(np.float32), mask_any.astype(np.float32), out_shape)
    frac = _correlate(tissue_c, mask_frac, out_shape) / np.float32(mask_frac.sum())

    donor_lab = _donor_colour(donor_image, mask, donor_tissue)
    colour = _coarse_colour_difference(
        background, tissue_c, mask_any, donor_lab, f, ring=ring, colour_scale=colour_scale,
        out_shape=out_shape,
    )

    # ---- the grid (coarse units), offset drawn from rng
    step = grid_step if grid_step is not None else max(f, round(min(H, W) / 32))
    jj, ii = _grid_positions(rng, max(1, round(step / f)), out_shape)
    ok = (overlap[jj, ii] < 0.5) & (frac[jj, ii] >= min_tissue - 0.05)
    jj, ii = jj[ok], ii[ok]
    if jj.size == 0:
        return None
    xs, ys = ii * f, jj * f

    def terms(x, y, t, c):
        edge = np.minimum(np.minimum(x, y), np.minimum(W - w - x, H - h - y)).astype(np.float64)
        e_term = np.clip(1.0 - edge / edge_margin, 0.0, 1.0) if edge_margin > 0 else 0 * edge
        span = preferred_tissue - min_tissue
        t_term = np.clip((preferred_tissue - t) / span, 0, 1) if span > 0 else 0 * t
        penalty = w_edge * e_term + w_tissue * t_term + w_colour * np.asarray(c) / colour_scale
        return edge, penalty

    _, penalty = terms(xs, ys, frac[jj, ii].astype(np.float64), colour[jj, ii])
    order = np.lexsort((xs, ys, penalty))
    area = float(np.count_nonzero(mask))
    for k in order:
        x, y = int(xs[k]), int(ys[k])
        if (hard[y : y + h, x : x + w] & mask).any():  # cannot happen (conservative test)
            continue
        t = float(np.count_nonzero(tissue[y : y + h, x : x + w] & mask)) / area
        if t < min_tissue:
            continue
        ring_mask, pad = _ring(mask, ring)
        c = _ring_colour_difference(tissue, background, ring_mask, pad, donor_lab, x, y,
                                    colour_scale)
        edge, pen = terms(np.array(x), np.array(y), np.float64(t), c)
        return Placement(
            x=x,
            y=y,
            penalty=float(pen),
            edge_distance=float(edge),
            tissue_fraction=t,
            colour_difference=float(c),
            width=w,
            height=h,
        )
    return None
