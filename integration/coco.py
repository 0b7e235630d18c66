"""COCO instance-segmentation pieces that neither read nor write a file: run-length
encoding of binary masks, polygons to masks, shapely geometry to COCO segmentation, and
category ids.

Conventions (pycocotools'): a mask is (height, width), 1 = object; RLE runs go down the
columns (column-major, Fortran order), start with a run of zeros (possibly 0 long) and
alternate; ``counts`` is either a list of ints (uncompressed RLE) or pycocotools' compact
string (compressed RLE: each run, from the fourth on as the difference to the run two
before, in 5-bit groups offset by 48). Polygon coordinates are pixels, origin top-left,
y down; pixel (row i, column j) covers ``[j, j+1) × [i, i+1)`` and is inside a polygon
when its centre (j + 0.5, i + 0.5) is (:func:`histosynth.integration.masks.rasterize`;
pycocotools' rasteriser agrees up to pixels whose centre lies on an edge).

Example::

    rle = encode_rle(mask)                 # {"size": [h, w], "counts": "..."}
    assert (decode_rle(rle) == (mask > 0)).all()
    ids = category_ids(["Vessel", "Vessel: Invasive"])   # {"Vessel": 1, "Vessel: Invasive": 2}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from histosynth.integration.geometry import polygon_parts
from histosynth.integration.masks import rasterize

__all__ = [
    "MAX_RLE_PIXELS",
    "bbox_of_mask",
    "categories",
    "category_ids",
    "decode_rle",
    "encode_rle",
    "geometry_has_holes",
    "mask_from_polygons",
    "polygons_of",
]

#: The most pixels :func:`decode_rle` and :func:`mask_from_polygons` make (16384², the
#: largest tile histosynth writes); larger sizes are refused before anything is allocated.
MAX_RLE_PIXELS = 16384 * 16384


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a binary mask, starting with a run of zeros."""
    flat = np.asarray(mask).ravel(order="F") != 0
    if flat.size == 0:
        return [0]  # what pycocotools writes for an empty grid
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs.insert(0, 0)
    return runs


def _counts_to_string(runs: list[int]) -> str:
    """pycocotools' ``rleToString``."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _string_to_counts(text: str) -> list[int]:
    """pycocotools' ``rleFrString``; ValueError on a character outside its alphabet or a
    truncated last run."""
    runs: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("RLE counts string ends inside a run")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE counts string has a character {text[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if k > 13:  # 65 bits: no real run is that long
                raise ValueError("RLE counts string has a run longer than 64 bits")
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _size(rle: Mapping[str, Any]) -> tuple[int, int]:
    size = rle.get("size") if isinstance(rle, Mapping) else None
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise ValueError(f"RLE size must be [height, width] of non-negative ints, not {size!r}")
    return int(size[0]), int(size[1])


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a binary mask (any non-zero value is 1), as
    ``pycocotools.mask.encode`` writes it, with ``counts`` as a str.

    Args:
        mask: (height, width) array.

    Returns:
        ``{"size": [height, width], "counts": str}``.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {array.shape}")
    height, width = array.shape
    return {"size": [int(height), int(width)], "counts": _counts_to_string(_runs(array))}


def decode_rle(rle: Mapping[str, Any], *, max_pixels: int = MAX_RLE_PIXELS) -> np.ndarray:
    """The mask of a COCO RLE, compressed (``counts`` a str or bytes) or not (a list of
    non-negative ints), as uint8 0 / 1 of shape ``size``.

    Raises:
        ValueError: a malformed size or counts, runs that are negative or do not add up to
            height × width, or more than ``max_pixels`` pixels — checked before the mask
            is allocated.
    """
    height, width = _size(rle)
    if height * width > max_pixels:
        raise ValueError(f"RLE size {height} x {width} exceeds {max_pixels} pixels")
    counts = rle.get("counts")
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ValueError("RLE counts bytes are not ASCII") from exc
    if isinstance(counts, str):
        runs = _string_to_counts(counts)
    elif isinstance(counts, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in counts
    ):
        runs = list(counts)
    else:
        raise ValueError("RLE counts must be a string or a list of ints")
    if any(run < 0 for run in runs):
        raise ValueError("RLE counts hold a negative run")
    if sum(runs) != height * width:
        raise ValueError(
            f"RLE counts add up to {sum(runs)} pixels, not {height} x {width} = "
            f"{height * width}"
        )
    values = (np.arange(len(runs)) % 2).astype(np.uint8)
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    return np.ascontiguousarray(flat.reshape((width, height)).T)


def mask_from_polygons(
    polygons: list[list[float]], height: int, width: int, *, max_pixels: int = MAX_RLE_PIXELS
) -> np.ndarray:
    """The union of COCO polygons (each ``[x1, y1, x2, y2, ...]``, tile pixels; each
    polygon filled even-odd) on a ``height`` × ``width`` grid, as uint8 0 / 1.

    Raises:
        ValueError: a polygon with fewer than 3 points, an odd number of values, a value
            that is not a finite number, or a grid of more than ``max_pixels`` pixels.
    """
    height, width = int(height), int(width)
    if height < 0 or width < 0 or height * width > max_pixels:
        raise ValueError(f"grid {height} x {width} is negative or exceeds {max_pixels} pixels")
    shapes = []
    for k, flat in enumerate(polygons):
        if not isinstance(flat, list | tuple) or len(flat) % 2 or len(flat) < 6:
            raise ValueError(f"polygon {k} must be a list of at least 3 x, y pairs")
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in flat
        ):
            raise ValueError(f"polygon {k} holds a value that is not a finite number")
        points = np.asarray(flat, dtype=float).reshape(-1, 2)
        shapes.append(Polygon(points))  # possibly invalid: rasterised even-odd as given
    mask = rasterize(shapes, origin=(0.0, 0.0), scale=1.0, shape=(height, width))
    return (mask > 0).astype(np.uint8)


def geometry_has_holes(geometry: BaseGeometry | None) -> bool:
    """Whether any polygon part of ``geometry`` has an interior ring."""
    return any(len(part.interiors) for part in polygon_parts(geometry))


def polygons_of(geometry: BaseGeometry | None) -> list[list[float]]:
    """COCO polygon segmentation of a hole-free geometry: one flat ``[x1, y1, ...]`` list
    per polygon part (its exterior ring, the closing point dropped), coordinates as given
    (tile pixels). Holes are not representable this way: use :func:`encode_rle` of the
    rasterised geometry when :func:`geometry_has_holes`."""
    out = []
    for part in polygon_parts(geometry):
        coords = list(part.exterior.coords)
        if len(coords) > 1 and coords[0] == coords[-1]:
            coords = coords[:-1]
        if len(coords) >= 3:
            out.append([float(v) for point in coords for v in point[:2]])
    return out


def bbox_of_mask(mask: np.ndarray) -> list[float]:
    """COCO ``bbox`` ``[x, y, width, height]`` (pixels) of a mask's non-zero pixels;
    ``[0, 0, 0, 0]`` for an empty mask (pycocotools' ``toBbox``)."""
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    cols = np.flatnonzero(np.asarray(mask).any(axis=0))
    if not rows.size:
        return [0.0, 0.0, 0.0, 0.0]
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def category_ids(class_names: Iterable[str]) -> dict[str, int]:
    """Stable COCO category ids: the distinct class names sorted, numbered 1..N."""
    return {name: k for k, name in enumerate(sorted(set(class_names)), start=1)}


def categories(ids: Mapping[str, int], supercategory: str = "vessel") -> list[dict]:
    """COCO ``categories`` of :func:`category_ids`' mapping, by id."""
    return [
        {"id": k, "name": name, "supercategory": supercategory}
        for name, k in sorted(ids.items(), key=lambda item: item[1])
    ]
