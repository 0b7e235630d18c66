"""Shape guidance: a donor vessel warped so that its outline lands on a target outline.

The method (docs/engine-facts.md, "Shape-guided vessels"): both outlines are resampled to
``count`` points at equal arc-length steps, turned the same way round, and paired by the
cyclic shift that brings them closest once their centroids and areas agree (so a point
on the donor's wall goes to the nearest-placed point of the target's). A thin-plate
spline (TPS) fitted to those pairs, and to the same pairs pushed ``ring`` px outward along
their normals (so the donor's own ring of tissue keeps its width), maps every target
pixel back to a donor pixel; the donor's image and pasted region are resampled through it
(``cv2.remap``). A TPS is the smoothest map (least bending energy) through the pairs:
inside the outline the wall and lumen are stretched smoothly, not folded, and a small
``smoothing`` keeps near-duplicate pairs from making it oscillate. What the warp
stretches, the masked partial diffusion afterwards repairs.

Coordinates are (x, y) pixels, y down. Outlines are (n, 2) float arrays, not closed
(the last point is not the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "WarpedDonor",
    "deform_outline",
    "match_outlines",
    "outline_area",
    "resample_outline",
    "thin_plate_spline",
    "warp_donor",
]

#: points per outline; enough for a smooth 1024 px vessel, few enough for a fast solve
OUTLINE_POINTS = 96


def outline_area(outline: np.ndarray) -> float:
    """Signed area (px²) of a closed polygon (shoelace); positive when it runs
    counter-clockwise in (x, y-down) pixels as displayed, i.e. clockwise in maths axes."""
    x, y = outline[:, 0], outline[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def resample_outline(outline: np.ndarray, count: int = OUTLINE_POINTS) -> np.ndarray:
    """``count`` points at equal arc-length steps along the closed polygon ``outline``
    ((n, 2), n ≥ 3), starting at its first point, turned to positive signed area.

    Raises ValueError: fewer than 3 points, or no length.
    """
    points = np.asarray(outline, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"an outline needs at least 3 (x, y) points, got {points.shape}")
    if np.allclose(points[0], points[-1]):
        points = points[:-1]
    if outline_area(points) < 0:
        points = points[::-1]
    closed = np.vstack([points, points[:1]])
    steps = np.hypot(*np.diff(closed, axis=0).T)
    total = float(steps.sum())
    if not total > 0:
        raise ValueError("the outline has no length")
    at = np.concatenate([[0.0], np.cumsum(steps)])
    wanted = np.arange(count) * (total / count)
    return np.stack(
        [np.interp(wanted, at, closed[:, 0]), np.interp(wanted, at, closed[:, 1])], axis=1
    )


def match_outlines(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``source`` (resampled, as :func:`resample_outline`) re-ordered by the cyclic shift
    that pairs it best with ``target`` (same count): least squared distance once both are
    centred and scaled to the same area."""
    if source.shape != target.shape:
        raise ValueError(f"outlines of {source.shape} and {target.shape} points")

    def normal(points: np.ndarray) -> np.ndarray:
        centred = points - points.mean(axis=0)
        return centred / np.sqrt(abs(outline_area(points)) or 1.0)

    a, b = normal(source), normal(target)
    # |a_{i+k} - b_i|² summed over i, for every shift k, by one circular correlation
    cross = np.real(
        np.fft.ifft(np.fft.fft(a[:, 0]) * np.conj(np.fft.fft(b[:, 0])))
        + np.fft.ifft(np.fft.fft(a[:, 1]) * np.conj(np.fft.fft(b[:, 1])))
    )
    shift = int(np.argmax(cross))
    return np.roll(source, -shift, axis=0)


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, r2 * np.log(r2), 0.0)


def thin_plate_spline(
    control: np.ndarray, values: np.ndarray, smoothing: float = 1.0
):
    """The 2-D thin-plate spline f with f(control[i]) ≈ values[i] ((n, 2) each, px);
    ``smoothing`` (px²) relaxes the fit (0: exact). Returns f: (m, 2) points → (m, 2)."""
    control = np.asarray(control, dtype=float)
    values = np.asarray(values, dtype=float)
    n = len(control)
    centre = control.mean(axis=0)
    scale = float(np.abs(control - centre).max()) or 1.0
    c = (control - centre) / scale  # conditioned: unit-sized coordinates
    kernel = _tps_kernel(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    kernel[np.diag_indices(n)] += smoothing / scale**2
    affine = np.hstack([np.ones((n, 1)), c])
    system = np.zeros((n + 3, n + 3))
    system[:n, :n], system[:n, n:], system[n:, :n] = kernel, affine, affine.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = values
    weights = np.linalg.lstsq(system, rhs, rcond=None)[0]

    def apply(points: np.ndarray) -> np.ndarray:
        p = (np.asarray(points, dtype=float) - centre) / scale
        r2 = ((p[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        return _tps_kernel(r2) @ weights[:n] + np.hstack([np.ones((len(p), 1)), p]) @ weights[n:]

    return apply


def _normals(outline: np.ndarray) -> np.ndarray:
    """Unit outward normals of a positively oriented (as displayed) outline."""
    tangent = np.roll(outline, -1, axis=0) - np.roll(outline, 1, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    length = np.hypot(normal[:, 0], normal[:, 1])[:, None]
    return normal / np.where(length > 0, length, 1.0)


@dataclass(eq=False)
class WarpedDonor:
    """A donor warped onto a target outline, in the target's frame (``shape`` px).

    ``image``: uint8 RGB; ``region``: bool, the donor's pasted region (vessel and its
    tissue ring) carried through the warp; ``source_x`` / ``source_y``: float32 maps, the
    donor pixel each target pixel was taken from."""

    image: np.ndarray
    region: np.ndarray
    source_x: np.ndarray
    source_y: np.ndarray


def warp_donor(
    donor_image: np.ndarray,
    donor_region: np.ndarray,
    donor_outline: np.ndarray,
    target_outline: np.ndarray,
    shape: tuple[int, int],
    *,
    ring: float = 0.0,
    count: int = OUTLINE_POINTS,
    grid: int = 4,
) -> WarpedDonor:
    """The donor (``donor_image`` uint8 RGB, ``donor_region`` its pasted region) warped
    so that ``donor_outline`` (donor px) lands on ``target_outline`` (px of a frame of
    ``shape`` (H, W)), with ``ring`` px of the donor's surroundings kept as wide beyond
    it. The map is evaluated every ``grid`` px and interpolated between (it is smooth).
    """
    height, width = shape
    source = resample_outline(donor_outline, count)
    target = resample_outline(target_outline, count)
    source = match_outlines(source, target)
    control, values = [target], [source]
    if ring > 0:
        control.append(target + ring * _normals(target))
        values.append(source + ring * _normals(source))
    # target → donor (backward map, what remap needs)
    mapping = thin_plate_spline(np.vstack(control), np.vstack(values))
    ys = np.arange(0, height + grid, grid, dtype=float)
    xs = np.arange(0, width + grid, grid, dtype=float)
    gx, gy = np.meshgrid(xs, ys)
    coarse = mapping(np.stack([gx.ravel(), gy.ravel()], axis=1)).reshape(len(ys), len(xs), 2)
    # pixel centres: (j, i) → coarse cell (j / grid, i / grid)
    full_x = cv2.resize(coarse[..., 0].astype(np.float32), None, fx=grid, fy=grid,
                        interpolation=cv2.INTER_LINEAR)
    full_y = cv2.resize(coarse[..., 1].astype(np.float32), None, fx=grid, fy=grid,
                        interpolation=cv2.INTER_LINEAR)
    off = (grid - 1) / 2  # INTER_LINEAR's half-pixel convention
    rows = np.clip(np.arange(height) + off, 0, full_x.shape[0] - 1).round().astype(int)
    cols = np.clip(np.arange(width) + off, 0, full_x.shape[1] - 1).round().astype(int)
    map_x = np.ascontiguousarray(full_x[np.ix_(rows, cols)])
    map_y = np.ascontiguousarray(full_y[np.ix_(rows, cols)])
    image = cv2.remap(np.ascontiguousarray(donor_image), map_x, map_y, cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REFLECT_101)
    region = cv2.remap(np.asarray(donor_region, dtype=np.uint8) * np.uint8(255), map_x, map_y,
                       cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return WarpedDonor(image, region >= 128, map_x, map_y)


def deform_outline(
    outline: np.ndarray,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float],
    elastic: float = 0.12,
    waves: int = 4,
    count: int = OUTLINE_POINTS,
) -> np.ndarray:
    """A new outline from ``outline`` (px): a smooth random elastic field along its
    normals (``waves`` lowest frequencies, amplitude up to ``elastic`` × its equivalent
    radius), then a random rotation, a flip half of the time and a scale to an area drawn
    log-uniformly from ``area_range`` (px²); centred on (0, 0). Seeded by ``rng`` alone.
    """
    points = resample_outline(outline, count)
    centre = points.mean(axis=0)
    radius = np.sqrt(abs(outline_area(points)) / np.pi)
    phase = np.arange(count) * (2 * np.pi / count)
    field = np.zeros(count)
    for k in range(1, waves + 1):
        amp = rng.uniform(0, elastic) * radius / k
        field += amp * np.cos(k * phase + rng.uniform(0, 2 * np.pi))
    points = points + field[:, None] * _normals(points) - centre
    angle = rng.uniform(0, 2 * np.pi)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = points @ turn.T
    if rng.random() < 0.5:
        points[:, 0] = -points[:, 0]
    low, high = area_range
    area = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if high > low else low
    points *= np.sqrt(area / abs(outline_area(points)))
    return resample_outline(points, count)
