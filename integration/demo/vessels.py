"""Vessels and the tumour region of the demo slide, built from real H&E crops.

A :class:`~histosynth.integration.demo.crops.CropLibrary` is cut once from a real H&E image
(``build_crop_library``, in :mod:`histosynth.integration.demo.crops`):
nuclei (hematoxylin-rich connected components, each with a soft alpha mask, turned so
its long axis runs along x), eosin-rich stroma patches (turned so their fibres run along
x), red-cell texture (the reddest eosin blobs) and pale lumen pixels. ``paint_vessel``
then builds a vessel from them inside its outline (a :class:`Shape`, which is the
annotation): the wall is real stroma warped along the outline with ``cv2.remap`` (fibres
run round the lumen, thickness varies along the contour), flattened real nuclei line
the lumen (endothelium) and lie in the wall (smooth muscle), the lumen is pale plasma
with clusters of biconcave red cells textured from real red pixels, and an invasive
vessel carries a tumour embolus (real tumour tissue and real tumour nuclei) in its
lumen. ``paint_tumour`` crowds real tumour nuclei into a region. Everything is seeded
by the caller's generator: same generator state, same pixels.

Size: one painter — the wall, endothelium, lumen, red cells and embolus of a vessel are
drawn by steps that share its outline's warp field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from histosynth.integration.demo.crops import (
    STROMA_PATCH,
    CropLibrary,
    Nucleus,
    build_crop_library,
    cellular_window,
    smoothstep,
)

__all__ = [
    "CropLibrary",
    "Nucleus",
    "Shape",
    "build_crop_library",
    "paint_tumour",
    "paint_vessel",
    "point_at",
    "random_shape",
]

#: Overlap of the stroma patches (source px) when they are quilted into a wall strip.
STROMA_OVERLAP = 12

#: Stroma texture is stretched this much along the contour, so fibres run round the lumen.
FIBRE_STRETCH = 1.6


# ----------------------------------------------------------------------------- outlines


@dataclass
class Shape:
    """A closed star-shaped outline: ellipse (a, b, angle) with a smooth radial wobble."""

    a: float  # semi-axes, level-0 px
    b: float
    angle: float  # radians
    harmonics: list[tuple[int, float, float]]  # (k, amplitude, phase)
    cx: float = 0.0
    cy: float = 0.0
    _relative_bounds: tuple[float, float, float, float] | None = None

    def wobble(self, phi: np.ndarray) -> np.ndarray:
        out = np.ones_like(phi)
        for k, amp, phase in self.harmonics:
            out += amp * np.cos(k * phi + phase)
        return out

    def outline(
        self,
        scale: float = 1.0,
        min_vertices: int = 48,
        profile: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Vertices (N, 2) of the outline scaled radially by ``scale`` (and by
        ``profile(phi)`` where given), level-0 px."""
        perimeter = math.pi * (self.a + self.b) * scale
        n = int(np.clip(perimeter / 6, min_vertices, 400))
        phi = np.linspace(0, 2 * math.pi, n, endpoint=False)
        r = self.wobble(phi) * scale
        if profile is not None:
            r = r * profile(phi)
        u, v = self.a * r * np.cos(phi), self.b * r * np.sin(phi)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + c * u - s * v, self.cy + s * u + c * v], axis=1)

    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the outline at the current centre, level-0 px."""
        if self._relative_bounds is None:
            cx, cy = self.cx, self.cy
            self.cx = self.cy = 0.0
            vertices = self.outline()
            self.cx, self.cy = cx, cy
            self._relative_bounds = (*vertices.min(axis=0), *vertices.max(axis=0))
        minx, miny, maxx, maxy = self._relative_bounds
        return minx + self.cx, miny + self.cy, maxx + self.cx, maxy + self.cy

    @property
    def radius(self) -> float:
        """Radius of a circle about the centre that holds the whole outline."""
        return max(self.a, self.b) * (1 + sum(abs(h[1]) for h in self.harmonics))

    def rho(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius (1 on the outline) and polar angle of points."""
        dx, dy = xs - self.cx, ys - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        phi = np.arctan2(v / self.b, u / self.a)
        return np.hypot(u / self.a, v / self.b) / self.wobble(phi), phi

    def reach(self, phi: np.ndarray) -> np.ndarray:
        """Distance from the centre to the outline along polar angle ``phi``, level-0 px
        (a point at normalised radius ``rho`` lies ``rho · reach`` from the centre)."""
        return self.wobble(phi) * np.hypot(self.a * np.cos(phi), self.b * np.sin(phi))


def random_shape(rng: np.random.Generator, diameter_px: float, wobble: float) -> Shape:
    """A seeded outline of about ``diameter_px`` level-0 px, aspect 1–1.7."""
    aspect = rng.uniform(1.0, 1.7)
    radius = diameter_px / 2
    harmonics = [
        (k, float(rng.uniform(0.3, 1.0) * wobble / k), float(rng.uniform(0, 2 * math.pi)))
        for k in (2, 3, 4, 5)
    ]
    return Shape(
        a=radius * math.sqrt(aspect),
        b=radius / math.sqrt(aspect),
        angle=float(rng.uniform(0, math.pi)),
        harmonics=harmonics,
    )


def point_at(shape: Shape, t: float, level: float) -> tuple[float, float]:
    """Level-0 point at polar angle ``t`` and normalised radius ``level`` of ``shape``."""
    r = level * (1 + sum(amp * math.cos(k * t + phase) for k, amp, phase in shape.harmonics))
    u, v = shape.a * r * math.cos(t), shape.b * r * math.sin(t)
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    return shape.cx + c * u - s * v, shape.cy + s * u + c * v


def _tangent_angle(shape: Shape, t: float, level: float) -> float:
    """Direction (radians, image axes) of the outline at polar angle ``t``."""
    px, py = point_at(shape, t - 0.005, level)
    qx, qy = point_at(shape, t + 0.005, level)
    return math.atan2(qy - py, qx - px)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed over ``sigma`` px (made at reduced size)."""
    factor = max(1, int(sigma // 2))
    small = (max(shape[0] // factor, 1) + 1, max(shape[1] // factor, 1) + 1)
    noise = rng.standard_normal(small).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), max(sigma / factor, 0.5))
    noise = cv2.resize(
        noise, (small[1] * factor, small[0] * factor), interpolation=cv2.INTER_LINEAR
    )
    noise = noise[: shape[0], : shape[1]]
    return noise / (noise.std() + 1e-6)


# ----------------------------------------------------------------------------- compositing


def _patch_grid(
    image: np.ndarray, shape: Shape, margin: float
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """Bounds (x0, y0, x1, y1) of the patch round ``shape`` and its pixel centres (level-0
    px, float32)."""
    height, width = image.shape[:2]
    minx, miny, maxx, maxy = shape.bounds()
    x0, y0 = min(max(int(minx - margin), 0), width), min(max(int(miny - margin), 0), height)
    x1, y1 = (
        max(min(int(maxx + margin) + 1, width), x0),
        max(min(int(maxy + margin) + 1, height), y0),
    )
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (x0, y0, x1, y1), xs + 0.5, ys + 0.5


def _stamp(
    patch: np.ndarray,
    rgba: np.ndarray,
    centre: tuple[float, float],
    angle: float,
    size: tuple[float, float],
    opacity: float,
    clip: np.ndarray | None = None,
    darken: bool = True,
) -> None:
    """Blend a crop onto ``patch`` (float32 RGB, in place): ``rgba`` resized to ``size``
    (length along its x, width; px), its x axis turned to ``angle`` (radians), centred at
    ``centre`` (patch px, x right, y down). ``darken`` keeps the darker of crop and patch
    (nuclei over tissue); ``clip`` (patch-sized, 0–1) scales the alpha."""
    length, width = max(size[0], 2.0), max(size[1], 2.0)
    crop = cv2.resize(
        rgba, (max(round(length), 2), max(round(width), 2)), interpolation=cv2.INTER_AREA
    )
    h, w = crop.shape[:2]
    half = math.ceil(0.5 * math.hypot(w, h)) + 2
    cx, cy = centre
    x0, y0 = math.floor(cx) - half, math.floor(cy) - half
    c, s = math.cos(angle), math.sin(angle)
    u0, v0 = (w - 1) / 2, (h - 1) / 2
    # window (qx, qy) -> crop: R(-angle) (q + origin - centre) + crop centre
    dx, dy = x0 - cx, y0 - cy
    matrix = np.array(
        [[c, s, u0 + c * dx + s * dy], [-s, c, v0 - s * dx + c * dy]], dtype=np.float64
    )
    out = cv2.warpAffine(
        crop,
        matrix,
        (2 * half, 2 * half),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(255, 255, 255, 0),
    )
    ph, pw = patch.shape[:2]
    ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + 2 * half, pw), min(y0 + 2 * half, ph)
    if ax1 <= ax0 or ay1 <= ay0:
        return
    out = out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
    alpha = out[..., 3] * opacity
    if clip is not None:
        alpha = alpha * clip[ay0:ay1, ax0:ax1]
    region = patch[ay0:ay1, ax0:ax1]
    colour = np.minimum(region, out[..., :3]) if darken else out[..., :3]
    region += (colour - region) * alpha[..., None]


def _quilt_strip(
    patches: tuple[np.ndarray, ...], rng: np.random.Generator, length: int, height: int
) -> np.ndarray:
    """A (height, L, 3) float32 strip quilted from ``patches`` (fibres along x), periodic
    along x with period ``L`` (``length`` rounded up to whole patch steps)."""
    size, overlap = STROMA_PATCH, STROMA_OVERLAP
    step = size - overlap
    cols = max(-(-length // step), 2)
    rows = max(-(-(height - overlap) // step), 1)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
    line = np.ones(size, np.float32)
    line[:overlap], line[size - overlap :] = ramp, ramp[::-1]
    weight = np.outer(line, line)
    full_w, full_h = cols * step + overlap, rows * step + overlap
    total = np.zeros((full_h, full_w, 3), np.float32)
    weights = np.zeros((full_h, full_w), np.float32)
    for r in range(rows):
        for c in range(cols):
            patch = patches[int(rng.integers(len(patches)))]
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            if rng.random() < 0.5:
                patch = patch[::-1]
            ys, xs = slice(r * step, r * step + size), slice(c * step, c * step + size)
            total[ys, xs] += patch * weight[..., None]
            weights[ys, xs] += weight
    # wrap: the last overlap columns continue into the first ones
    total[:, :overlap] += total[:, cols * step :]
    weights[:, :overlap] += weights[:, cols * step :]
    strip = total[:, : cols * step] / np.maximum(weights[:, : cols * step], 1e-6)[..., None]
    return np.ascontiguousarray(strip[: max(height, 1)])


def _wall_profile(rng: np.random.Generator, wall: float) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised radius of the lumen edge as a function of polar angle: ``1 - wall``
    modulated by ±30 % along the contour (a smooth, seeded profile)."""
    harmonics = [
        (k, float(rng.uniform(0.04, 0.14)), float(rng.uniform(0, 2 * math.pi))) for k in (1, 2, 3)
    ]

    def inner(phi: np.ndarray) -> np.ndarray:
        factor = np.ones_like(phi)
        for k, amp, phase in harmonics:
            factor = factor + amp * np.cos(k * phi + phase)
        return 1.0 - wall * factor

    return inner


def _arc_table(shape: Shape, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Polar angles (0–2π) and the arc length (level-0 px) of the outline at ``level``
    up to each of them."""
    phis = np.linspace(0, 2 * math.pi, 1025)
    r = shape.wobble(phis) * level
    u, v = shape.a * r * np.cos(phis), shape.b * r * np.sin(phis)
    steps = np.hypot(np.diff(u), np.diff(v))
    return phis, np.concatenate([[0.0], np.cumsum(steps)])


# ----------------------------------------------------------------------------- painting


def _lumen_colour(
    library: CropLibrary, rng: np.random.Generator, grid: tuple[int, int], um: float
) -> np.ndarray:
    """Pale plasma for a (h, w) grid: real pale pixels as grain over a base colour drawn
    from them, with faint swirls of real pink plasma."""
    h, w = grid
    pale = library.pale
    base = pale[rng.integers(len(pale), size=64)].mean(axis=0)
    small = (max(h // 2, 1), max(w // 2, 1))
    grain = pale[rng.integers(len(pale), size=small[0] * small[1])].reshape(*small, 3)
    grain = cv2.resize(grain, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = base + 0.6 * (cv2.GaussianBlur(grain, (0, 0), 0.7) - pale.mean(axis=0))
    plasma = rng.uniform(0.15, 0.6) if rng.random() < 0.7 else 0.0
    if plasma > 0:
        swirl = np.clip(_smooth_noise(rng, grid, 5 * um) * 0.25 + 0.75, 0, 1)
        mix = (plasma * swirl)[..., None]
        colour = colour * (1 - mix) + library.plasma * mix
    return colour.astype(np.float32)


def _red_cell(
    library: CropLibrary, rng: np.random.Generator, radius: float, tilt: float
) -> np.ndarray:
    """One biconcave red cell, (k, k, 4) float32 RGBA, axes along x and y: texture from
    a real red crop (or the real red colour), a paler centre, a soft rim."""
    k = math.ceil(2 * radius) + 3
    if library.red:
        crop = library.red[int(rng.integers(len(library.red)))]
        ch, cw = crop.shape[:2]
        side = min(ch, cw)
        y, x = int(rng.integers(0, ch - side + 1)), int(rng.integers(0, cw - side + 1))
        texture = cv2.resize(crop[y : y + side, x : x + side], (k, k))
    else:
        texture = np.broadcast_to(library.red_colour, (k, k, 3)).astype(np.float32)
    if library.stroma:
        # real fine grain: the high-pass detail of a real stroma patch
        grain = library.stroma[int(rng.integers(len(library.stroma)))].mean(axis=-1)
        grain = cv2.resize(grain - cv2.GaussianBlur(grain, (0, 0), 1.5), (k, k))
        texture = texture + 0.6 * grain[..., None]
    texture = texture * np.float32(rng.uniform(0.96, 1.04))
    yy, xx = np.mgrid[0:k, 0:k].astype(np.float32) - (k - 1) / 2
    theta = np.arctan2(yy, xx)
    bumps = (
        1
        + 0.05 * np.cos(2 * theta + rng.uniform(0, 6.3))
        + 0.03 * np.cos(3 * theta + rng.uniform(0, 6.3))
    )
    r = np.hypot(xx / radius, yy / (radius * tilt)) / bumps
    alpha = 1.0 - smoothstep(0.8, 1.04, r)
    pallor = 0.28 * np.exp(-((r / 0.42) ** 2)) * tilt
    rim = 0.06 * np.exp(-(((r - 0.85) / 0.12) ** 2))
    colour = 255 - (255 - texture) * (1 - pallor + rim)[..., None]
    return np.dstack([np.clip(colour, 0, 255), 0.9 * alpha]).astype(np.float32)


def _lumen_point(
    shape: Shape,
    inner: Callable[[np.ndarray], np.ndarray],
    point: tuple[float, float],
    margin: float,
) -> bool:
    """Whether ``point`` (level-0 px) lies ``margin`` px inside the lumen edge."""
    rho, phi = shape.rho(np.array([point[0]]), np.array([point[1]]))
    reach = float(shape.reach(phi)[0])
    return bool(rho[0] * reach + margin < float(inner(phi)[0]) * reach)


@dataclass
class _LumenPaint:
    """What painting into a vessel's lumen works on: the float RGB ``patch`` whose corner
    is at level-0 px ``origin``, the vessel's ``shape`` and lumen profile ``inner``
    (normalised radius by angle), the crops to paint from, the seeded generator and
    ``um`` (level-0 px per µm)."""

    patch: np.ndarray
    origin: tuple[int, int]
    shape: Shape
    inner: Callable[[np.ndarray], np.ndarray]
    library: CropLibrary
    rng: np.random.Generator
    um: float


def _paint_red_cells(
    paint: _LumenPaint,
    lumen: np.ndarray,
    count: int,
    level: tuple[float, float] = (0.45, 0.85),
) -> None:
    """A clump of ``count`` red cells (diameter 6.5–8 µm) in the lumen (``lumen``: its
    patch-sized mask), packed by a random walk from a seeded start."""
    patch, origin, shape, inner = paint.patch, paint.origin, paint.shape, paint.inner
    library, rng, um = paint.library, paint.rng, paint.um
    t = rng.uniform(0, 2 * math.pi)
    start = point_at(shape, t, rng.uniform(*level) * float(inner(np.array([t]))[0]))
    placed: list[tuple[float, float]] = []
    current = start
    for _ in range(count * 6):
        if len(placed) >= count:
            break
        radius = rng.uniform(3.2, 4.0) * um
        if placed:
            base = placed[int(rng.integers(len(placed)))]
            step = rng.uniform(1.2, 1.9) * radius
            turn = rng.uniform(0, 2 * math.pi)
            current = (base[0] + step * math.cos(turn), base[1] + step * math.sin(turn))
        if not _lumen_point(shape, inner, current, radius + 0.5 * um):
            current = start
            continue
        placed.append(current)
        tilt = rng.uniform(0.7, 1.0)
        cell = _red_cell(library, rng, radius, tilt)
        centre = (current[0] - origin[0] - 0.5, current[1] - origin[1] - 0.5)
        _stamp(
            patch,
            cell,
            centre,
            rng.uniform(0, math.pi),
            cell.shape[1::-1],
            1.0,
            clip=lumen,
            darken=False,
        )


def _paint_embolus(paint: _LumenPaint, lumen: np.ndarray) -> np.ndarray:
    """A tumour embolus in the lumen: a cohesive blob (half to two thirds of the lumen's
    diameter) of real tumour tissue crowded with real tumour nuclei, with a retraction
    space of ~1.5 µm to the endothelium; returns its alpha (patch-sized). ``lumen``: the
    lumen's patch-sized mask."""
    patch, origin, shape, inner = paint.patch, paint.origin, paint.shape, paint.inner
    library, rng, um = paint.library, paint.rng, paint.um
    lumen_r = math.sqrt(shape.a * shape.b) * float(inner(np.linspace(0, 2 * math.pi, 16)).mean())
    t = rng.uniform(0, 2 * math.pi)
    blob = random_shape(rng, 2 * rng.uniform(0.45, 0.65) * lumen_r, 0.18)
    blob.cx, blob.cy = point_at(shape, t, rng.uniform(0.0, 0.3) * float(inner(np.array([t]))[0]))
    h, w = patch.shape[:2]
    alpha = np.zeros((h, w), np.float32)
    minx, miny, maxx, maxy = blob.bounds()
    x0, y0 = max(int(minx) - origin[0] - 2, 0), max(int(miny) - origin[1] - 2, 0)
    x1, y1 = min(int(maxx) - origin[0] + 3, w), min(int(maxy) - origin[1] + 3, h)
    if x1 <= x0 or y1 <= y0:
        return alpha
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    rho, _ = blob.rho(xs + origin[0] + 0.5, ys + origin[1] + 0.5)
    g = max(round(1.5 * um), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1))
    shrink = cv2.erode(np.ascontiguousarray(lumen[y0:y1, x0:x1]), kernel)
    edge = 1.2 / math.sqrt(blob.a * blob.b)
    alpha[y0:y1, x0:x1] = (1.0 - smoothstep(1.0 - edge, 1.0 + edge, rho)) * shrink
    # tumour cytoplasm a little denser and more purple than the average source tissue
    tissue = cellular_window(library, rng, (x1 - x0, y1 - y0))
    tissue *= np.array([0.93, 0.9, 0.95], np.float32)
    region = patch[y0:y1, x0:x1]
    region += (tissue - region) * (0.97 * alpha[y0:y1, x0:x1])[..., None]
    area_um2 = math.pi * blob.a * blob.b / um**2
    nuclei = library.tumour
    for _ in range(int(area_um2 / 90) + 2):
        bt, level = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.85))
        px, py = point_at(blob, bt, level)
        nucleus = nuclei[int(rng.integers(len(nuclei)))]
        scale = rng.uniform(0.85, 1.15)
        size = (nucleus.rgba.shape[1] * scale, nucleus.rgba.shape[0] * scale)
        centre = (px - origin[0] - 0.5, py - origin[1] - 0.5)
        _stamp(patch, nucleus.rgba, centre, rng.uniform(0, 2 * math.pi), size, 0.9, clip=alpha)
    return alpha


def _along_curve(
    shape: Shape, t: float, level: float, length: float, width: float
) -> tuple[float, float]:
    """(length, width) px of a straight nucleus laid along the outline at (t, level),
    shortened where the outline curves so tightly that its ends would stand off the
    curve by more than half its width (sagitta ``L² / 8R``)."""
    radius = level * float(shape.reach(np.array([t]))[0])
    return min(length, math.sqrt(4.0 * max(radius, 1.0) * width)), width


def paint_vessel(
    image: np.ndarray,
    shape: Shape,
    wall: float,
    mpp: float,
    rng: np.random.Generator,
    library: CropLibrary,
    *,
    invasive: bool = False,
) -> np.ndarray:
    """Paint a vessel in place inside ``shape`` (uint8 RGB ``image``, level-0 px) from
    the real crops of ``library``, and return its lumen outline (N, 2), level-0 px.

    The wall (normalised radius from the lumen edge, about ``1 - wall`` and varying by
    up to ±30 % along the contour, to 1) is real stroma warped along the outline, with
    flat endothelial nuclei on its lumen side and elongated smooth-muscle nuclei inside;
    the lumen is pale plasma, with a clump of red cells in about 60 % of vessels;
    ``invasive`` vessels hold a tumour embolus. Nothing is painted outside the outline
    (an anti-aliased edge of 1 px). ``mpp``: µm per level-0 px.
    """
    um = 1.0 / mpp
    inner = _wall_profile(rng, wall)
    (x0, y0, x1, y1), xs, ys = _patch_grid(image, shape, 3)
    if x1 <= x0 or y1 <= y0:
        return shape.outline(profile=inner)
    patch = image[y0:y1, x0:x1].astype(np.float32)
    rho, phi = shape.rho(xs, ys)
    reach = shape.reach(phi)
    depth = (1.0 - rho) * reach  # px inside the outline, along the ray from the centre
    thickness = (1.0 - inner(phi)) * reach
    inside = smoothstep(-0.8, 0.8, depth)
    # the lumen edge is not a perfect curve: up to ±0.4 µm of smooth irregularity
    amplitude = min(0.4 * um, 0.15 * math.sqrt(shape.a * shape.b) * wall)
    ragged = amplitude * np.clip(_smooth_noise(rng, depth.shape, 4 * um), -2, 2)
    lumen = smoothstep(-0.8, 0.8, depth - thickness + ragged) * inside

    # wall: real stroma, fibres along the contour (x of the strip = arc length)
    mean_r = math.sqrt(shape.a * shape.b)
    phis, arc = _arc_table(shape, 1.0 - wall / 2)
    height = math.ceil(float(thickness[inside > 0].max(initial=1.0))) + 4
    strip = _quilt_strip(library.stroma, rng, math.ceil(arc[-1] / FIBRE_STRETCH), height)
    period = strip.shape[1]
    map_x = (np.interp(np.mod(phi, 2 * math.pi), phis, arc) * (period / arc[-1])).astype(np.float32)
    map_y = np.clip(depth, 0, height - 1).astype(np.float32)
    texture = cv2.remap(strip, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    # the media (inner half of the wall) a little denser than the adventitia
    media = smoothstep(0.35, 0.75, depth / np.maximum(thickness, 1.0))[..., None]
    texture = texture * (1.0 - 0.06 * media)
    # the adventitia merges into the tissue round it over up to 2 µm (ragged), inside the
    # outline
    ramp = np.minimum(2.0 * um, 0.3 * np.maximum(thickness, 1.0))
    merge = np.clip(depth / ramp + 0.5 * _smooth_noise(rng, depth.shape, 2 * um), 0, 1)
    patch += (texture - patch) * (inside * (0.35 + 0.65 * merge))[..., None]

    # lumen: pale plasma from real pale pixels
    colour = _lumen_colour(library, rng, patch.shape[:2], um)
    patch += (colour - patch) * lumen[..., None]

    origin = (x0, y0)
    spindle = library.spindle

    def level_of(t: float, s: float) -> float:
        """Normalised radius a fraction ``s`` of the wall in from the outline."""
        return 1.0 - s * (1.0 - float(inner(np.array([t]))[0]))

    # smooth-muscle nuclei: elongated, cigar-shaped, along the contour inside the wall
    lumen_r = mean_r * (1.0 - wall)
    ring_um2 = math.pi * (mean_r**2 - lumen_r**2) / um**2
    for _ in range(int(ring_um2 / 180) + 2):
        t, s = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.8)
        level = level_of(t, s)
        px, py = point_at(shape, t, level)
        angle = _tangent_angle(shape, t, level) + rng.normal(0, 0.12)
        nucleus = spindle[int(rng.integers(len(spindle)))]
        size = _along_curve(shape, t, level, rng.uniform(9, 14) * um, rng.uniform(2.6, 3.6) * um)
        _stamp(patch, nucleus.rgba, (px - x0 - 0.5, py - y0 - 0.5), angle, size, 0.75, clip=inside)

    # endothelium: thin, flat nuclei tightly spaced along the lumen edge
    lumen_outline = shape.outline(profile=inner)
    closed = np.vstack([lumen_outline, lumen_outline[:1]])
    perimeter_um = float(np.hypot(*np.diff(closed, axis=0).T).sum()) / um
    count = max(int(perimeter_um / rng.uniform(9, 12)), 4)
    # evenly spaced along the lumen edge (by arc length), each jittered by a third of a gap
    lumen_phis, lumen_arc = _arc_table(shape, 1.0 - wall)
    slots = (np.arange(count) + rng.uniform(-0.33, 0.33, count) + rng.uniform()) / count
    for t in np.interp(np.mod(slots, 1.0) * lumen_arc[-1], lumen_arc, lumen_phis):
        width = rng.uniform(1.8, 2.6) * um
        level = level_of(t, 1.0) + 0.45 * width / float(shape.reach(np.array([t]))[0])
        px, py = point_at(shape, t, level)
        nucleus = spindle[int(rng.integers(len(spindle)))]
        size = _along_curve(shape, t, level, rng.uniform(7, 11) * um, width)
        angle = _tangent_angle(shape, t, level)
        _stamp(patch, nucleus.rgba, (px - x0 - 0.5, py - y0 - 0.5), angle, size, 0.95, clip=inside)

    free = lumen
    paint = _LumenPaint(patch, origin, shape, inner, library, rng, um)
    if invasive:
        embolus = _paint_embolus(paint, lumen)
        free = lumen * (1.0 - embolus)
    if rng.random() < (0.35 if invasive else 0.6) and lumen_r > 5 * um:
        count = int(np.clip(rng.integers(3, 9) * lumen_r / (15 * um), 3, 30))
        _paint_red_cells(paint, free, count)

    np.clip(patch + 0.5, 0, 255, out=patch)
    image[y0:y1, x0:x1] = patch.astype(np.uint8)
    return lumen_outline


def paint_tumour(
    image: np.ndarray, shape: Shape, mpp: float, rng: np.random.Generator, library: CropLibrary
) -> None:
    """Crowd real, hyperchromatic tumour nuclei and a purple tint into ``shape``, in
    place (uint8 RGB ``image``, level-0 px; ``mpp`` µm per px)."""
    um = 1.0 / mpp
    (x0, y0, x1, y1), xs, ys = _patch_grid(image, shape, 3)
    if x1 <= x0 or y1 <= y0:
        return
    patch = image[y0:y1, x0:x1].astype(np.float32)
    rho, phi = shape.rho(xs, ys)
    inside = smoothstep(-1.0, 1.0, (1.0 - rho) * shape.reach(phi))
    patch += (np.array([150, 100, 175], np.float32) - patch) * (0.25 * inside)[..., None]
    area_um2 = math.pi * shape.a * shape.b / um**2
    nuclei = library.tumour
    for _ in range(int(area_um2 / 121)):
        t, level = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.95))
        px, py = point_at(shape, t, level)
        nucleus = nuclei[int(rng.integers(len(nuclei)))]
        scale = rng.uniform(0.9, 1.2)
        size = (nucleus.rgba.shape[1] * scale, nucleus.rgba.shape[0] * scale)
        _stamp(
            patch,
            nucleus.rgba,
            (px - x0 - 0.5, py - y0 - 0.5),
            rng.uniform(0, 2 * math.pi),
            size,
            0.85,
            clip=inside,
        )
    np.clip(patch + 0.5, 0, 255, out=patch)
    image[y0:y1, x0:x1] = patch.astype(np.uint8)
