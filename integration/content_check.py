"""The content check: does a tile look like H&E tissue? Measured from its pixels, no model.

Every synthetic tile is measured before it is written, against thresholds calibrated from
real tiles of the run's own slides (:func:`calibrate`), and its verdict goes into the
``qc`` column of ``index.csv`` (``pass``, or ``fail: <reasons>``):

- **H&E gamut** — the share of stained pixels (optical density ‖OD‖ > 0.15, OD =
  −log₁₀((I + 1) / 256) per channel) whose OD lies near the plane of the haematoxylin and
  eosin stain vectors (Ruifrok & Johnston's, as ``skimage.color.rgb2hed``): a relative
  residual ≤ 0.3 and no stain amount below −0.15 ‖OD‖. Cyan, green or hue-rotated
  pixels lie far off that plane.
- **Detail ratio** — the tile's detail energy (mean squared difference of its grey image
  and the image blurred by a Gaussian of σ = 2 px) over the source tissue's (the
  background of an inpainted tile, the reference of a variation): noise and speckle ≫ 1,
  blur → 0.
- **Colour outliers** — the share of pixels that are near black (max channel < 30) or of
  a saturated pure colour (max − min channel > 200), which stained tissue never is.
- **Mask on tissue** (rows with a mask) — the share of mask pixels on tissue (the
  caller's tissue mask with its holes filled, so a vessel's lumen counts).

The pixels a harmoniser redrew around an inpainted vessel (changed by more than
:data:`CHANGED_LEVELS` from its ``composite``: a band, a small part of the tile) are
checked again on their own — gamut, outliers, and detail against the same pixels of the
composite, noise only (a regenerated seam is softer than real tissue by design), and at
least :data:`GAMUT_KEPT` of the composite's in-gamut share kept — so noise
confined to a seam cannot hide in the tile's averages; those reasons start with ``seam:``.

Example:
    >>> rng = np.random.default_rng(0)
    >>> pink = np.clip(rng.normal((225, 150, 190), 12, (128, 128, 3)), 0, 255).astype(np.uint8)
    >>> thresholds = calibrate([pink])
    >>> check_tile(pink, thresholds, source=pink).cell
    'pass'
    >>> cyan = np.zeros_like(pink); cyan[..., 1:] = 255
    >>> check_tile(cyan, thresholds, source=pink).cell  # doctest: +ELLIPSIS
    'fail: H&E gamut 0.00 < ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

__all__ = [
    "QC_PASS",
    "ContentThresholds",
    "ContentVerdict",
    "TileMeasures",
    "calibrate",
    "check_tile",
    "measure_redrawn",
    "measure_tile",
    "qc_failed",
]

QC_PASS = "pass"
"""The ``qc`` cell of a tile that passed."""

# Ruifrok & Johnston's haematoxylin and eosin OD vectors (skimage.color.rgb2hed), unit length
_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float64)
_HE /= np.linalg.norm(_HE, axis=1, keepdims=True)
_HE_PINV = np.linalg.pinv(_HE.T)  # (2, 3): OD → stain amounts (least squares)
STAINED_OD = 0.15
"""‖OD‖ above which a pixel is stained (below: glass, lumen, white)."""
GAMUT_RESIDUAL = 0.3
"""Largest relative residual ‖OD − projection‖ / ‖OD‖ of an in-gamut pixel."""
DETAIL_SIGMA = 2.0
"""Gaussian σ (px) of the detail energy's blur."""

# bounds the calibration never goes beyond, whatever the real tiles show
_GAMUT_CAP = 0.5
_RATIO_LOW_CAP, _RATIO_HIGH_FLOOR = 0.4, 2.5
_OUTLIER_FLOOR = 0.02
_MASK_CAP = 0.5


@dataclass(frozen=True)
class TileMeasures:
    """What :func:`measure_tile` found in one tile (shares in [0, 1])."""

    gamut: float
    detail: float
    outliers: float
    detail_ratio: float | None = None
    mask_on_tissue: float | None = None
    #: the gamut share of the same pixels before they were redrawn (:func:`measure_redrawn`)
    gamut_before: float | None = None


@dataclass(frozen=True)
class ContentThresholds:
    """Where a tile fails; :func:`calibrate` derives them from real tiles.

    Attributes:
        gamut_min: lowest H&E-gamut share.
        detail_ratio: ``(low, high)`` of the detail energy over the source's.
        outliers_max: highest share of colour outliers.
        mask_on_tissue_min: lowest share of a mask lying on tissue.
        real_tiles: how many real tiles they were calibrated on (0: the built-in bounds).
        real: the real tiles' ranges (and the median gamut share), for ``run.json``.
    """

    gamut_min: float = _GAMUT_CAP
    detail_ratio: tuple[float, float] = (_RATIO_LOW_CAP, _RATIO_HIGH_FLOOR)
    outliers_max: float = _OUTLIER_FLOOR
    mask_on_tissue_min: float = _MASK_CAP
    real_tiles: int = 0
    real: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The thresholds as ``run.json`` keeps them."""
        data = asdict(self)
        data["detail_ratio"] = list(self.detail_ratio)
        return data


@dataclass(frozen=True)
class ContentVerdict:
    """A tile's measures and the reasons it failed (none: it passed)."""

    measures: TileMeasures
    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def cell(self) -> str:
        """The ``qc`` cell: ``pass`` or ``fail: <reason>; <reason>``."""
        return QC_PASS if self.passed else "fail: " + "; ".join(self.reasons)


def qc_failed(cell: str | None) -> bool:
    """Whether an ``index.csv`` ``qc`` cell records a failed content check."""
    return bool(cell) and str(cell).strip().lower().startswith("fail")


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or not array.size:
        raise ValueError(f"{what}: expected a uint8 RGB image (H, W, 3), found "
                         f"{array.dtype} {array.shape}")
    return array


#: fewest pixels a region is checked on (below, its shares say little)
MIN_REGION_PX = 256
#: grey levels (any channel) by which a harmoniser must change a composite's pixel for
#: it to count as redrawn
CHANGED_LEVELS = 10
#: share of the composite's in-gamut pixels that redrawing must keep in the gamut
GAMUT_KEPT = 0.6


def _detail(image: np.ndarray, region: np.ndarray | None = None) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    energy = (grey - cv2.GaussianBlur(grey, (0, 0), DETAIL_SIGMA)) ** 2
    return float(np.mean(energy if region is None else energy[region]))


def _pixels(image: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return image.reshape(-1, 3) if region is None else image[region]


def _gamut(image: np.ndarray, region: np.ndarray | None = None) -> float:
    od = -np.log10((_pixels(image, region).astype(np.float64) + 1.0) / 256.0)
    norm = np.linalg.norm(od, axis=1)
    stained = norm > STAINED_OD
    if not stained.any():
        return 1.0  # all glass: nothing off the gamut (the tissue checks catch emptiness)
    od, norm = od[stained], norm[stained]
    amounts = od @ _HE_PINV.T  # (n, 2)
    residual = np.linalg.norm(od - amounts @ _HE, axis=1) / norm
    inside = (residual <= GAMUT_RESIDUAL) & (amounts >= -0.15 * norm[:, None]).all(axis=1)
    return float(inside.mean())


def _outliers(image: np.ndarray, region: np.ndarray | None = None) -> float:
    pixels = _pixels(image, region)
    high = pixels.max(axis=1).astype(np.int16)
    low = pixels.min(axis=1).astype(np.int16)
    return float(((high < 30) | (high - low > 200)).mean())


def _ratio(detail: float, reference: float) -> float:
    if reference > 1e-6:
        return detail / reference
    return 1.0 if detail < 1e-6 else float("inf")


def measure_tile(
    image: np.ndarray,
    *,
    source: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    tissue: np.ndarray | None = None,
) -> TileMeasures:
    """The content measures of one uint8 RGB tile.

    Args:
        image: the tile.
        source: the real tissue it was made from (any size): gives ``detail_ratio``.
        mask: its vessel mask (non-zero = vessel), with ``tissue`` (bool, the same size;
            e.g. ``histosynth.integration.masks.tissue_mask``): gives ``mask_on_tissue``.
    """
    image = _rgb(image, "tile")
    detail = _detail(image)
    ratio = None if source is None else _ratio(detail, _detail(_rgb(source, "source")))
    on_tissue = None
    if mask is not None and tissue is not None:
        vessel = np.asarray(mask) > 0
        if vessel.shape != image.shape[:2] or np.asarray(tissue).shape != vessel.shape:
            raise ValueError("mask and tissue must have the tile's height and width")
        if vessel.any():
            filled = ndimage.binary_fill_holes(np.asarray(tissue, bool))
            on_tissue = float(filled[vessel].mean())
    return TileMeasures(
        gamut=_gamut(image),
        detail=detail,
        outliers=_outliers(image),
        detail_ratio=None if ratio is None else float(ratio),
        mask_on_tissue=on_tissue,
    )


def calibrate(
    real: Sequence[np.ndarray],
    masked: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
) -> ContentThresholds:
    """Thresholds from real tiles of the run's slides.

    A synthetic tile fails where it is further from H&E than any of these: gamut below
    0.6 × the lowest real share (at most 0.5); a detail ratio outside ½ … 2 × the widest
    ratio between two real tiles (at least 0.4 … 2.5); colour outliers above 2 × the
    highest real share + 0.005 (at least 0.02); a mask on tissue below 0.6 × the lowest
    real share (at most 0.5). With no real tile the bounds alone apply.

    Args:
        real: uint8 RGB tiles (any sizes).
        masked: ``(image, mask, tissue)`` of real vessels, for the mask-on-tissue bound.
    """
    measures = [measure_tile(image) for image in real]
    on_tissue = [
        m.mask_on_tissue
        for m in (measure_tile(image, mask=mask, tissue=tissue) for image, mask, tissue in masked)
        if m.mask_on_tissue is not None
    ]
    if not measures:
        return ContentThresholds()
    gamut = [m.gamut for m in measures]
    details = [m.detail for m in measures if m.detail > 1e-6]
    outliers = [m.outliers for m in measures]
    widest = max(details) / min(details) if details else 1.0
    return ContentThresholds(
        gamut_min=round(min(_GAMUT_CAP, 0.6 * min(gamut)), 4),
        detail_ratio=(
            round(min(_RATIO_LOW_CAP, 0.5 / widest), 4),
            round(max(_RATIO_HIGH_FLOOR, 2.0 * widest), 4),
        ),
        outliers_max=round(max(_OUTLIER_FLOOR, 2.0 * max(outliers) + 0.005), 4),
        mask_on_tissue_min=round(min(_MASK_CAP, 0.6 * min(on_tissue)), 4) if on_tissue
        else _MASK_CAP,
        real_tiles=len(measures),
        real={
            "gamut": [round(min(gamut), 4), round(max(gamut), 4)],
            "gamut_median": round(float(np.median(gamut)), 4),
            "detail": [round(min(details), 2), round(max(details), 2)] if details else [],
            "outliers": [round(min(outliers), 4), round(max(outliers), 4)],
            "mask_on_tissue": [round(min(on_tissue), 4), round(max(on_tissue), 4)]
            if on_tissue
            else [],
        },
    )


def measure_redrawn(image: np.ndarray, composite: np.ndarray) -> TileMeasures | None:
    """Gamut, outliers and the detail ratio of the pixels ``image`` changed from
    ``composite`` by more than :data:`CHANGED_LEVELS` (against the same pixels of the
    composite); ``None`` for fewer than :data:`MIN_REGION_PX` such pixels."""
    image, before = _rgb(image, "tile"), _rgb(composite, "composite")
    if before.shape != image.shape:
        raise ValueError("the composite must have the tile's size")
    region = np.abs(image.astype(np.int16) - before).max(axis=2) > CHANGED_LEVELS
    if region.sum() < MIN_REGION_PX:
        return None
    detail = _detail(image, region)
    return TileMeasures(
        gamut=_gamut(image, region),
        detail=detail,
        outliers=_outliers(image, region),
        detail_ratio=_ratio(detail, _detail(before, region)),
        gamut_before=_gamut(before, region),
    )


def check_tile(
    image: np.ndarray,
    thresholds: ContentThresholds,
    *,
    source: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    tissue: np.ndarray | None = None,
    composite: np.ndarray | None = None,
) -> ContentVerdict:
    """Measure a tile (:func:`measure_tile`) and say where it fails ``thresholds``; with
    the ``composite`` an inpainted tile was harmonised from, its redrawn pixels again on
    their own (:func:`measure_redrawn`, reasons prefixed ``seam:``, no blur bound)."""
    m = measure_tile(image, source=source, mask=mask, tissue=tissue)
    reasons = _reasons(m, thresholds)
    if composite is not None:
        redrawn = measure_redrawn(image, composite)
        if redrawn is not None:
            reasons += [f"seam: {r}" for r in _reasons(redrawn, thresholds, blur=False)]
    return ContentVerdict(m, tuple(reasons))


def _reasons(m: TileMeasures, t: ContentThresholds, *, blur: bool = True) -> list[str]:
    reasons = []
    if m.gamut < t.gamut_min:
        reasons.append(f"H&E gamut {m.gamut:.2f} < {t.gamut_min:.2f}")
    elif m.gamut_before is not None and m.gamut < GAMUT_KEPT * m.gamut_before:
        reasons.append(
            f"H&E gamut {m.gamut:.2f} < {GAMUT_KEPT:g} × its {m.gamut_before:.2f} before"
        )
    if m.detail_ratio is not None:
        low, high = t.detail_ratio
        if m.detail_ratio > high:
            reasons.append(f"detail ×{m.detail_ratio:.2f} of the source > {high:.2f} (noise)")
        elif blur and m.detail_ratio < low:
            reasons.append(f"detail ×{m.detail_ratio:.2f} of the source < {low:.2f} (blur)")
    if m.outliers > t.outliers_max:
        reasons.append(f"colour outliers {m.outliers:.3f} > {t.outliers_max:.3f}")
    if m.mask_on_tissue is not None and m.mask_on_tissue < t.mask_on_tissue_min:
        reasons.append(f"mask on tissue {m.mask_on_tissue:.2f} < {t.mask_on_tissue_min:.2f}")
    return reasons
