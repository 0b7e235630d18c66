"""TIFF writers: pyramidal OME-TIFF (calibrated, as QuPath's Bio-Formats, TIAToolbox and
tifffile read it), an uncalibrated TIFF, and the pyramid levels of a TIFF. Every write is
atomic. Units: ``mpp`` is µm per level-0 pixel; sizes are pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from histosynth.common.files import atomic_write_with

__all__ = [
    "CALIBRATED_TILE",
    "tiff_levels",
    "write_calibrated_tiff",
    "write_pyramidal_ome_tiff",
    "write_uncalibrated_tiff",
]

#: tile side (px) of the calibrated TIFFs of synthetic tiles
CALIBRATED_TILE = 256


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError("image has no pixels")
    return np.ascontiguousarray(rgb)


def _compression_args(compression: str | None) -> dict[str, Any]:
    if compression is None or compression == "none":
        return {"compression": None}
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": 90}}
    if compression in ("zlib", "deflate", "lzw", "zstd", "webp", "jpeg2000"):
        return {"compression": compression}
    raise ValueError(f"unsupported compression {compression!r}")


def write_pyramidal_ome_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    *,
    mpp: float,
    tile: int = 256,
    levels: int | None = None,
    compression: str | None = "jpeg",
) -> Path:
    """Write ``rgb`` as a tiled pyramidal OME-TIFF, atomically.

    Level 0 in the main IFD, reduced levels (each half the previous, area-averaged) in
    its SubIFDs (``NewSubfileType`` 1), the layout of ``bfconvert -pyramid-resolutions``.
    Pixel size in the TIFF resolution tags (pixels per cm) and in OME-XML
    ``PhysicalSizeX/Y`` (µm). TIAToolbox opens it as a ``TIFFWSIReader`` with this mpp.

    Args:
        path: target file; name it ``*.ome.tif`` (readers pick the OME reader by name).
        rgb: uint8 (H, W, 3) level-0 pixels.
        mpp: µm per level-0 pixel.
        tile: tile side in pixels (multiple of 16).
        levels: number of pyramid levels; default: halve until the level fits one tile.
        compression: ``"jpeg"`` (quality 90, YCbCr), ``"zlib"``, ``"lzw"``, ``None``, ...
    """
    rgb = _check_rgb(rgb)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be positive, not {mpp!r}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, not {tile!r}")
    pyramid = [rgb]
    while True:
        height, width = pyramid[-1].shape[:2]
        if levels is not None and len(pyramid) >= levels:
            break
        if levels is None and max(height, width) <= tile:
            break
        if min(height, width) < 2:
            if levels is not None:
                raise ValueError(f"image too small for {levels} pyramid levels")
            break
        pyramid.append(
            cv2.resize(pyramid[-1], (width // 2, height // 2), interpolation=cv2.INTER_AREA)
        )
    codec = _compression_args(compression)
    full_width = rgb.shape[1]
    bigtiff = sum(level.nbytes for level in pyramid) > 2**31

    def write(tmp: str) -> None:
        options = {"tile": (tile, tile), "photometric": "rgb", **codec}
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
            tif.write(
                pyramid[0],
                subifds=len(pyramid) - 1,
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                metadata={
                    "axes": "YXS",
                    "Name": Path(path).name.split(".")[0],
                    "PhysicalSizeX": mpp,
                    "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": mpp,
                    "PhysicalSizeYUnit": "µm",
                },
                software="histosynth",
                **options,
            )
            for level in pyramid[1:]:
                level_mpp = mpp * full_width / level.shape[1]
                tif.write(
                    level,
                    subfiletype=1,
                    resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                    **options,
                )

    return atomic_write_with(path, write)


def write_uncalibrated_tiff(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write ``rgb`` as a single-page tiled TIFF without any pixel size (no resolution
    unit, no OME-XML), atomically: a slide that needs ``--mpp``."""
    rgb = _check_rgb(rgb)

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp) as tif:
            tif.write(
                rgb,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                metadata=None,
                resolution=None,
            )

    return atomic_write_with(path, write)


def tiff_levels(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level of the TIFF at ``path``, level 0 first."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        levels = [(int(page.imagewidth), int(page.imagelength))]
        for sub in page.pages or []:
            levels.append((int(sub.imagewidth), int(sub.imagelength)))
    return levels


def write_calibrated_tiff(
    path: str | os.PathLike, rgb: np.ndarray, mpp: float, *, tile: int = CALIBRATED_TILE
) -> list[tuple[int, int]]:
    """Write ``rgb`` as a lossless (zlib) tiled pyramidal OME-TIFF, atomically; return
    its levels as (width, height), level 0 first.

    The pixel size ``mpp`` (µm/px) is in the TIFF resolution tags (pixels per cm,
    ``ResolutionUnit`` CENTIMETER) and in OME-XML ``PhysicalSizeX/Y`` (µm), which
    Bio-Formats (QuPath), TIAToolbox and OpenSlide-less TIFF readers use.
    """
    return tiff_levels(write_pyramidal_ome_tiff(path, rgb, mpp=mpp, tile=tile, compression="zlib"))
