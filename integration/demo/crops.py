"""Real H&E crops for the demo slide's vessels: a :class:`CropLibrary` cut once from an image.

Nuclei (hematoxylin-rich connected components, each with a soft alpha mask, turned so its
long axis runs along x), eosin-rich stroma patches (turned so their fibres run along x),
red-cell texture (the reddest eosin blobs) and pale lumen pixels, by
:func:`build_crop_library`; :func:`cellular_window` cuts a nucleus-rich window for tumour
emboli. Sizes are in source pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed

__all__ = [
    "STROMA_PATCH",
    "CropLibrary",
    "Nucleus",
    "build_crop_library",
    "cellular_window",
    "smoothstep",
]

#: Side of the stroma patches cut from the source, px.
STROMA_PATCH = 40


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 below ``edge0``, 1 above ``edge1``, a smooth cubic between."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass(frozen=True)
class Nucleus:
    """A real nucleus: RGB and soft alpha (float32, (h, w, 4)), long axis along x.

    Attributes:
        rgba: colour (0–255) and alpha (0–1) of the crop.
        length, width: long and short extent of the nucleus, source px.
        od_h: mean hematoxylin optical density inside the nucleus.
    """

    rgba: np.ndarray
    length: float
    width: float
    od_h: float


@dataclass(frozen=True)
class CropLibrary:
    """Real H&E crops for painting demo vessels (see ``build_crop_library``).

    Attributes:
        nuclei: all nuclei found; ``spindle`` the elongated ones (long/short ≥ 1.7),
            ``tumour`` the large ones (area ≥ ``TUMOUR_AREA`` source px).
        stroma: (P, P, 3) float32 eosin-rich patches, fibres along x.
        red: (k, k, 3) float32 red-cell texture crops (may be empty).
        red_colour: mean RGB of the reddest eosin pixels.
        pale: (N, 3) float32 colours of pale (white-space) pixels.
        plasma: mean RGB of pale pink (eosin-tinged) pixels.
        source: the source image (uint8 RGB), for tumour tissue.
        pale_integral: integral image of the source's pale mask, to find windows of
            cohesive tissue (see :func:`cellular_window`).
    """

    nuclei: tuple[Nucleus, ...]
    spindle: tuple[Nucleus, ...]
    tumour: tuple[Nucleus, ...]
    stroma: tuple[np.ndarray, ...]
    red: tuple[np.ndarray, ...]
    red_colour: np.ndarray
    pale: np.ndarray
    plasma: np.ndarray
    source: np.ndarray = field(repr=False)
    pale_integral: np.ndarray = field(repr=False)


#: Nuclei of at least this area (source px) count as tumour nuclei.
TUMOUR_AREA = 550


def _rotated_window(
    image: np.ndarray,
    centre: tuple[float, float],
    angle: float,
    size: tuple[int, int],
    border: int = cv2.BORDER_REFLECT_101,
) -> np.ndarray:
    """``size`` (w, h) window of ``image`` centred at ``centre`` (x, y) whose x axis runs
    along ``angle`` (radians, image axes); bilinear, edges reflected (or ``border``,
    a cv2 border mode; constant means 0)."""
    w, h = size
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = centre
    # inverse map: window (u, v) -> image (cx + (u - w/2) d + (v - h/2) n), d = (c, s)
    u0, v0 = (w - 1) / 2, (h - 1) / 2
    matrix = np.array(
        [[c, -s, cx - c * u0 + s * v0], [s, c, cy - s * u0 - c * v0]], dtype=np.float64
    )
    return cv2.warpAffine(
        image,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=border,
        borderValue=0,
    )


def _extract_nuclei(rgb: np.ndarray, od_h: np.ndarray) -> list[tuple[Nucleus, float]]:
    """Hematoxylin-rich compact components of ``rgb`` as aligned crops, with their area
    (source px). The alpha follows the hematoxylin density, so a crop carries the
    nucleus and not the cytoplasm round it."""
    smooth = cv2.GaussianBlur(od_h, (0, 0), 2.0)
    threshold = max(float(np.percentile(smooth, 77)), 0.03)
    mask = ndimage.binary_fill_holes(smooth > threshold)
    labels, _ = ndimage.label(mask)
    fine = cv2.GaussianBlur(od_h, (0, 0), 1.0)
    density = smoothstep(0.6 * threshold, 1.1 * threshold, fine)
    height, width = mask.shape
    colour_image = rgb.astype(np.float32)
    out: list[tuple[Nucleus, float]] = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        ys, xs = box
        if ys.start < 3 or xs.start < 3 or ys.stop > height - 3 or xs.stop > width - 3:
            continue
        component = labels[box] == index
        area = float(component.sum())
        if not 100 <= area <= 3000:
            continue
        hull = cv2.convexHull(np.argwhere(component)[:, ::-1].astype(np.int32))
        if area / max(cv2.contourArea(hull), 1.0) < 0.9:
            continue
        py, px = np.nonzero(component)
        px, py = px + xs.start, py + ys.start
        cx, cy = float(px.mean()), float(py.mean())
        _, vectors = np.linalg.eigh(np.cov(np.stack([px - cx, py - cy])))
        angle = math.atan2(vectors[1, 1], vectors[0, 1])  # the long axis
        d = np.array([math.cos(angle), math.sin(angle)])
        n = np.array([-d[1], d[0]])
        rel = np.stack([px - cx, py - cy], axis=1)
        half_l, half_w = np.abs(rel @ d).max() + 0.5, np.abs(rel @ n).max() + 0.5
        size = (int(2 * half_l + 6), int(2 * half_w + 6))
        wy, wx = max(ys.start - 6, 0), max(xs.start - 6, 0)
        window = (labels[wy : ys.stop + 6, wx : xs.stop + 6] == index).astype(np.float32)
        window = cv2.GaussianBlur(window, (0, 0), 0.8)
        window *= density[wy : ys.stop + 6, wx : xs.stop + 6]
        alpha = _rotated_window(window, (cx - wx, cy - wy), angle, size, cv2.BORDER_CONSTANT)
        colour = _rotated_window(colour_image, (cx, cy), angle, size)
        rgba = np.dstack([colour, np.clip(alpha * 1.1, 0, 1)]).astype(np.float32)
        nucleus = Nucleus(rgba, 2 * half_l, 2 * half_w, float(od_h[py, px].mean()))
        out.append((nucleus, area))
    return out


def _extract_stroma(
    rgb: np.ndarray, stroma: np.ndarray, bad: np.ndarray, grey: np.ndarray, limit: int = 64
) -> list[np.ndarray]:
    """Up to ``limit`` square patches mostly of ``stroma`` and almost free of ``bad``
    pixels (nuclei, red cells, white space), turned so their fibres run along x."""
    size = STROMA_PATCH
    reach = int(size * 1.45)
    fraction = cv2.boxFilter(stroma.astype(np.float32), -1, (reach, reach))
    fraction -= 5 * cv2.boxFilter(bad.astype(np.float32), -1, (reach, reach))
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    jxx = cv2.GaussianBlur(gx * gx, (0, 0), size / 3)
    jyy = cv2.GaussianBlur(gy * gy, (0, 0), size / 3)
    jxy = cv2.GaussianBlur(gx * gy, (0, 0), size / 3)
    margin = reach // 2 + 1
    fraction[:margin], fraction[-margin:], fraction[:, :margin], fraction[:, -margin:] = 0, 0, 0, 0
    ys, xs = np.nonzero(fraction >= 0.2)
    order = np.argsort(-fraction[ys, xs], kind="stable")
    taken = np.zeros_like(stroma, dtype=bool)
    patches: list[np.ndarray] = []
    mask = np.dstack([stroma, bad]).astype(np.float32)
    spacing = size // 3
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        if taken[y, x]:
            continue
        taken[max(y - spacing, 0) : y + spacing, max(x - spacing, 0) : x + spacing] = True
        # fibres run across the mean gradient direction
        angle = 0.5 * math.atan2(2 * jxy[y, x], jxx[y, x] - jyy[y, x]) + math.pi / 2
        window = _rotated_window(mask, (x, y), angle, (size, size))
        if window[..., 0].mean() < 0.6 or window[..., 1].mean() > 0.05:
            continue
        patches.append(_rotated_window(rgb.astype(np.float32), (x, y), angle, (size, size)))
        if len(patches) >= limit:
            break
    if not patches:
        # no clean stroma: the most eosin-rich windows, whatever else they hold
        y, x = np.unravel_index(np.argsort(-fraction, axis=None, kind="stable")[:4], fraction.shape)
        patches = [
            _rotated_window(rgb.astype(np.float32), (int(b), int(a)), 0.0, (size, size))
            for a, b in zip(y, x, strict=True)
        ]
    if patches:
        # one stain for all: each patch keeps its texture but takes the mean colour of all
        mean = np.mean([p.mean(axis=(0, 1)) for p in patches], axis=0)
        patches = [p - p.mean(axis=(0, 1)) + mean for p in patches]
    return patches


def _red_mask(rgb: np.ndarray) -> np.ndarray:
    """Red-cell pixels: much redder than collagen (red − green > 120)."""
    r, g = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    return (r - g > 120) & (r > 170)


def _extract_red(rgb: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Red-cell texture crops (interiors of the reddest blobs) and their mean colour."""
    red = _red_mask(rgb).astype(np.uint8)
    red = cv2.morphologyEx(red, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    core = cv2.erode(red, np.ones((5, 5), np.uint8)) > 0
    colour = (rgb[core].mean(axis=0) if core.sum() >= 20 else np.array([205.0, 70.0, 90.0])).astype(
        np.float32
    )
    crops: list[np.ndarray] = []
    labels, _ = ndimage.label(core)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == index
        if min(inside.shape) < 16 or inside.mean() < 0.5:
            continue
        crop = rgb[box].astype(np.float32)
        fill = crop[inside].mean(axis=0)
        crop[~inside] = fill
        crops.append(cv2.GaussianBlur(crop, (0, 0), 0.6))
    return crops, colour


def build_crop_library(source: np.ndarray) -> CropLibrary:
    """Cut nuclei, stroma, red-cell texture and pale pixels out of ``source`` (uint8 RGB
    H&E); deterministic. Takes about 0.3 s for a 1000 × 1000 image."""
    rgb = np.ascontiguousarray(source)
    hed = rgb2hed(rgb).astype(np.float32)
    od_h, od_e = hed[..., 0], hed[..., 1]
    grey = rgb.mean(axis=-1, dtype=np.float32)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1]

    nuclei = _extract_nuclei(rgb, od_h)
    if not nuclei:
        raise ValueError("no nuclei found in the source H&E; cannot build demo vessels")
    bad = (
        (cv2.GaussianBlur(od_h, (0, 0), 2.0) > np.percentile(od_h, 80))
        | _red_mask(rgb)
        | (grey > 225)
    )
    bad = cv2.dilate(bad.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    all_nuclei = tuple(n for n, _ in nuclei)
    spindle = tuple(n for n, _ in nuclei if n.length >= 1.7 * n.width)
    tumour = tuple(n for n, area in nuclei if area >= TUMOUR_AREA)

    h_smooth = cv2.GaussianBlur(od_h, (0, 0), 1.5)
    e_smooth = cv2.GaussianBlur(od_e, (0, 0), 1.5)
    stroma = (
        (e_smooth > np.percentile(e_smooth, 55))
        & (h_smooth < np.percentile(h_smooth, 45))
        & (grey < 225)
        & (sat > 40)
    )
    patches = _extract_stroma(rgb, stroma, bad, grey)
    red, red_colour = _extract_red(rgb)

    pale_mask = (hsv[..., 2] > 225) & (sat < 30)
    pale = rgb[pale_mask].astype(np.float32)
    if len(pale) < 50:
        pale = np.array([[240.0, 232.0, 236.0]], dtype=np.float32)
    pink = (grey > 200) & (sat >= 30) & (sat < 70) & (od_e > np.median(od_e))
    plasma = rgb[pink].mean(axis=0) if pink.sum() >= 50 else np.array([236, 205, 220])
    return CropLibrary(
        nuclei=all_nuclei,
        spindle=spindle or all_nuclei,
        tumour=tumour or all_nuclei,
        stroma=tuple(patches),
        red=tuple(red),
        red_colour=red_colour,
        pale=pale,
        plasma=np.asarray(plasma, dtype=np.float32),
        source=rgb,
        pale_integral=cv2.integral(pale_mask.astype(np.uint8)),
    )


def cellular_window(
    library: CropLibrary, rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
    """A (h, w, 3) float32 window of real tissue with little white space, randomly turned
    by a multiple of 90° and maybe flipped (tiled by reflection if larger than the source)."""
    w, h = size
    source = library.source
    side = max(w, h)
    sh, sw = source.shape[:2]
    if side > min(sh, sw):
        reps = -(-side // min(sh, sw)) + 1
        source = np.pad(source, ((0, sh * reps), (0, sw * reps), (0, 0)), mode="symmetric")
        integral = cv2.integral(np.zeros(source.shape[:2], np.uint8))
    else:
        integral = library.pale_integral
    sh, sw = source.shape[:2]
    best, best_pale = (0, 0), math.inf
    for _ in range(12):
        y, x = int(rng.integers(0, sh - side + 1)), int(rng.integers(0, sw - side + 1))
        pale = (
            integral[y + side, x + side]
            - integral[y, x + side]
            - integral[y + side, x]
            + integral[y, x]
        )
        if pale < best_pale:
            best, best_pale = (y, x), pale
    y, x = best
    window = np.rot90(source[y : y + side, x : x + side], int(rng.integers(4)))
    if rng.random() < 0.5:
        window = window[:, ::-1]
    return window[:h, :w].astype(np.float32)
