"""Slides through TIAToolbox's ``WSIReader``, with explicit units.

Coordinates are full-resolution (level-0) pixels, origin top-left, y down — the
convention of QuPath and TIAToolbox. Resolutions are in µm per pixel (``mpp``). A tile is
``size`` × ``size`` pixels at ``mpp`` µm/px, placed by its top-left corner in level-0
pixels; it covers ``tile_extent(size, mpp, slide_mpp)`` level-0 pixels on each side.

>>> reader = open_slide("slide.ome.tif")                       # doctest: +SKIP
>>> x, y = centred_tile_origin(5000, 3000, 1024, 0.5, reader)  # doctest: +SKIP
>>> tile = read_tile(reader, x, y, 1024, 0.5)                  # doctest: +SKIP
>>> tile.shape, tile.dtype                                     # doctest: +SKIP
((1024, 1024, 3), dtype('uint8'))

TIAToolbox is imported on first use (it pulls in torch and takes seconds to import).
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from histosynth.common.geometry import TileGeometry
from histosynth.integration.errors import InputError
from histosynth.integration.files import check_not_special

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tiatoolbox.wsicore.wsireader import WSIReader

log = logging.getLogger(__name__)

__all__ = [
    "centred_tile_origin",
    "open_slide",
    "read_tile",
    "slide_mpp",
    "slide_size",
    "tile_extent",
]

#: Largest relative difference between the x and y pixel sizes that is still read as
#: square pixels (their mean is used). Tiles and masks assume square pixels.
MPP_XY_TOLERANCE = 0.01

#: Value of pixels outside the slide (white glass of a brightfield slide).
OUTSIDE_VALUE = 255

#: Largest window one tile read may take from a pyramid level, in pixels (3 bytes each:
#: 768 MiB). A tile far coarser than the slide's coarsest level would need more.
MAX_READ_PIXELS = 2**28

# Relative tolerance when matching a requested resolution to a pyramid level.
_LEVEL_TOLERANCE = 1e-3


class _DropTiatoolboxWarnings(logging.Filter):
    """Keep TIAToolbox's metadata guesses (logged as warnings on the root logger) quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING and "tiatoolbox" in record.pathname:
            log.debug("tiatoolbox: %s", record.getMessage())
            return False
        return True


@contextmanager
def _quiet_tiatoolbox() -> Iterator[None]:
    root = logging.getLogger()
    flt = _DropTiatoolboxWarnings()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _check_mpp(value: Any, what: str, path: str | os.PathLike | None = None) -> float:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not math.isfinite(mpp) or mpp <= 0:
        raise InputError(
            f"{what} must be a positive number of µm per pixel, not {value!r}", path=path
        )
    return mpp


#: Suffixes of the TIFF family (their tiles are located by offsets in the file).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")


def check_tiff_complete(path: Path) -> None:
    """InputError naming ``path`` when it is a TIFF whose image data reach beyond the end
    of the file (a copy cut short): a truncated slide is refused when it is opened, not
    read as silently wrong or undecodable tiles. Other formats pass unchecked."""
    if not path.is_file() or path.suffix.lower() not in TIFF_SUFFIXES:
        return
    import tifffile

    size = path.stat().st_size
    logger = logging.getLogger("tifffile")
    problems = _Collect()
    logger.addHandler(problems)
    propagate, logger.propagate = logger.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            need = 0
            # every IFD: the main ones and the pyramid levels (OME-TIFF keeps those in
            # SubIFDs, outside tif.pages)
            pages = [*tif.pages, *(p for s in tif.series for lv in s.levels for p in lv.pages)]
            for page in pages:
                offsets = getattr(page, "dataoffsets", None) or ()
                counts = getattr(page, "databytecounts", None) or ()
                ends = [o + c for o, c in zip(offsets, counts, strict=False)]
                if ends:
                    need = max(need, max(ends))
    except Exception as exc:  # the structure itself is cut or damaged
        message = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InputError(f"cannot open as a slide: {message}", path=path) from None
    finally:
        logger.removeHandler(problems)
        logger.propagate = propagate
    if need > size:
        raise InputError(
            f"cannot open as a slide: the file is truncated: it has {size} bytes, its image "
            f"data need {need} "
            f"({100 * size / need:.1f} % present); copy it again",
            path=path,
        )
    if problems.messages:  # tifffile read past a damaged or missing directory
        raise InputError(
            "cannot open as a slide: the TIFF structure is damaged or cut short "
            f"({problems.messages[0][:160]}); "
            "copy it again",
            path=path,
        )


class _Collect(logging.Handler):
    """Keeps the warnings tifffile logs while it parses a file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def open_slide(path: str | os.PathLike, *, mpp: float | None = None) -> WSIReader:
    """Open a whole-slide image with TIAToolbox (``WSIReader.open``).

    Args:
        path: slide file (OME-TIFF, SVS, NDPI, MRXS, generic tiled TIFF, PNG/JPEG, ...).
        mpp: µm per level-0 pixel; overrides what the file says (``--mpp`` on the
            command line). Required for a file without resolution metadata.

    Returns:
        The reader, its metadata already parsed.

    Raises:
        InputError: the file is missing, unreadable or not a supported slide, or it
            carries no resolution and ``mpp`` was not given.
    """
    path = Path(path)
    if mpp is not None:
        mpp = _check_mpp(mpp, "--mpp", path)
    if not path.exists():
        raise InputError("slide file not found", path=path)
    check_not_special(path)
    check_tiff_complete(path)
    from tiatoolbox.wsicore.wsireader import WSIReader  # slow: imported on first use

    try:
        with _quiet_tiatoolbox():
            reader = WSIReader.open(path, mpp=None if mpp is None else (mpp, mpp))
            info = reader.info
            width, height = (int(v) for v in info.slide_dimensions)
    except InputError:
        raise
    except Exception as exc:  # any reader failure means: not a slide we can read
        message = " ".join(str(exc).split()) or type(exc).__name__
        if len(message) > 200:
            message = message[:197] + "..."
        raise InputError(f"cannot open as a slide: {message}", path=path) from exc
    if width <= 0 or height <= 0:
        raise InputError(f"slide has no pixels ({width}×{height})", path=path)
    if info.mpp is None:
        raise InputError(
            "the slide has no pixel size (µm per pixel) in its metadata; "
            "pass it with --mpp (e.g. --mpp 0.25)",
            path=path,
        )
    slide_mpp(reader)  # validates the metadata value
    return reader


def _reader_path(reader: WSIReader) -> str | None:
    path = getattr(reader, "input_path", None)
    return None if path is None else str(path)


def slide_mpp(reader: WSIReader) -> float:
    """µm per level-0 pixel of an opened slide.

    Pixels must be square: x and y sizes may differ by at most ``MPP_XY_TOLERANCE``
    (1 %), and their mean is returned; otherwise :class:`InputError`.
    """
    mpp = reader.info.mpp
    path = _reader_path(reader)
    if mpp is None:
        raise InputError(
            "the slide has no pixel size (µm per pixel); pass it with --mpp", path=path
        )
    values = np.atleast_1d(np.asarray(mpp, dtype=float)).ravel()
    mx = _check_mpp(values[0], "pixel width", path)
    my = _check_mpp(values[1] if values.size > 1 else values[0], "pixel height", path)
    if abs(mx - my) > MPP_XY_TOLERANCE * min(mx, my):
        raise InputError(f"pixels are not square ({mx:g} × {my:g} µm); not supported", path=path)
    return (mx + my) / 2


def slide_size(reader: WSIReader) -> tuple[int, int]:
    """(width, height) of the slide in level-0 pixels."""
    width, height = reader.info.slide_dimensions
    return int(width), int(height)


def tile_extent(size_px: int, mpp: float, slide_mpp: float) -> float:
    """Side of a ``size_px`` tile at ``mpp`` µm/px, in level-0 pixels of a slide whose
    level-0 pixels are ``slide_mpp`` µm."""
    return TileGeometry(size_px, mpp).level0_extent(slide_mpp)


def centred_tile_origin(
    cx: float, cy: float, size: int, mpp: float, reader: WSIReader
) -> tuple[int, int]:
    """Top-left level-0 corner of the ``size`` px tile at ``mpp`` centred on (cx, cy).

    The tile is shifted to lie inside the slide; along an axis where the slide is
    smaller than the tile, the origin is 0. The corner is snapped to the pixel grid of
    the pyramid level :func:`read_tile` reads (within half a level pixel of centred), so
    the tile is cut from that level without resampling.
    """
    extent = tile_extent(size, mpp, slide_mpp(reader))
    width, height = slide_size(reader)
    _, ds = _best_level(reader, mpp / slide_mpp(reader))
    step = round(ds) if ds >= 1 and abs(ds - round(ds)) < 1e-6 else 1
    origin = []
    for centre, length in ((cx, width), (cy, height)):
        start = step * math.floor((centre - extent / 2) / step + 0.5)
        start = min(start, step * math.floor((length - extent) / step))
        origin.append(max(start, 0))
    return origin[0], origin[1]


def _best_level(reader: WSIReader, target_downsample: float) -> tuple[int, float]:
    """The coarsest pyramid level not coarser than ``target_downsample``, and its
    downsample (level-0 pixels per level pixel)."""
    downsamples = [float(d) for d in reader.info.level_downsamples]
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= target_downsample * (1 + _LEVEL_TOLERANCE) and ds > downsamples[best]:
            best = level
    return best, downsamples[best]


def _as_rgb(region: np.ndarray, path: str | None) -> np.ndarray:
    if region.ndim == 2:
        region = region[:, :, None]
    if region.ndim != 3:
        raise InputError(f"unexpected pixel array shape {region.shape}", path=path)
    channels = region.shape[2]
    if channels == 1:
        region = np.repeat(region, 3, axis=2)
    elif channels == 2:  # grey + alpha
        region = np.repeat(region[:, :, :1], 3, axis=2)
    elif channels >= 3:
        region = region[:, :, :3]  # drops alpha
    if region.dtype != np.uint8:
        if np.issubdtype(region.dtype, np.floating) and float(np.nanmax(region)) <= 255:
            region = np.clip(np.nan_to_num(region), 0, 255).round()
        else:
            raise InputError(
                f"only 8-bit RGB (brightfield) slides are supported, not {region.dtype}",
                path=path,
            )
        region = region.astype(np.uint8)
    return np.ascontiguousarray(region)


def _area_axis(image: np.ndarray, start: float, step: float, count: int, axis: int) -> np.ndarray:
    """Means of ``image`` (pixels as unit boxes) over ``[start + k·step, start + (k+1)·step)``
    for k < count along ``axis`` (0 or 1), from the running integral."""
    data = np.moveaxis(image, axis, 0).astype(np.float64)
    length = data.shape[0]
    integral = np.concatenate([np.zeros_like(data[:1]), np.cumsum(data, axis=0)], axis=0)
    edges = start + step * np.arange(count + 1)
    if edges[0] < -1e-9 or edges[-1] > length + 1e-9:
        raise ValueError("area resampling outside the window")  # a bug, not user input
    edges = np.clip(edges, 0, length)
    index = np.minimum(np.floor(edges).astype(np.int64), length - 1)
    frac = (edges - index).reshape((-1,) + (1,) * (data.ndim - 1))
    cumulative = integral[index] + frac * data[index]
    means = (cumulative[1:] - cumulative[:-1]) / step
    return np.moveaxis(means, 0, axis)


def _area_resample(window: np.ndarray, ox: float, oy: float, scale: float, size: int) -> np.ndarray:
    """``size`` × ``size`` tile whose pixel (i, j) is the mean of ``window`` over
    ``[ox + j·scale, ox + (j+1)·scale) × [oy + i·scale, oy + (i+1)·scale)`` (window pixels
    as unit squares): exact area averaging at any scale and sub-pixel offset."""
    first_row = max(math.floor(oy) - 1, 0)
    rows = window[first_row : math.ceil(oy + size * scale) + 1]
    columns = _area_axis(rows, ox, scale, size, axis=1)
    tile = _area_axis(columns, oy - first_row, scale, size, axis=0)
    return np.clip(np.rint(tile), 0, 255).astype(np.uint8)


def read_tile(reader: WSIReader, x: float, y: float, size: int, mpp: float) -> np.ndarray:
    """Pixels of the square tile whose top-left corner is (x, y) level-0 pixels,
    ``size`` × ``size`` pixels at ``mpp`` µm/px, as uint8 RGB ``(size, size, 3)``.

    Reads the coarsest pyramid level at least as fine as ``mpp`` through
    ``WSIReader.read_rect`` and resamples it exactly onto the tile's grid (area
    averaging when shrinking, cubic when enlarging, sub-pixel origin honoured), so
    tile pixel (i, j) covers level-0 ``[x + j·e/size, x + (j+1)·e/size)`` (e =
    :func:`tile_extent`) whatever the origin and the pyramid. The part of a tile beyond
    the slide's edge is white; a tile wholly outside the slide is an :class:`InputError`
    that says so.
    """
    if isinstance(size, bool) or int(size) != size or size <= 0:
        raise ValueError(f"tile size must be a positive integer, not {size!r}")
    size = int(size)
    mpp = _check_mpp(mpp, "tile mpp")
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"tile origin must be finite, not ({x!r}, {y!r})")
    path = _reader_path(reader)
    target_ds = mpp / slide_mpp(reader)
    extent = size * target_ds
    width0, height0 = slide_size(reader)
    if x >= width0 or y >= height0 or x + extent <= 0 or y + extent <= 0:
        raise InputError(
            f"the {size} px tile at {mpp:g} µm/px with its corner at level-0 ({x:.0f}, "
            f"{y:.0f}) lies outside the slide ({width0}×{height0} px)",
            path=path,
        )
    level, ds = _best_level(reader, target_ds)
    scale = target_ds / ds  # level pixels per tile pixel (>= ~1 unless enlarging)
    if abs(scale - 1) <= 1e-9:
        scale = 1.0
    # tile corner in level pixel coordinates
    lx, ly = x / ds, y / ds
    pad = math.ceil(2 * scale) + 3
    x0, y0 = math.floor(lx) - pad, math.floor(ly) - pad
    span = size * scale
    width = math.ceil(lx + span) + pad - x0
    height = math.ceil(ly + span) + pad - y0
    if width * height > MAX_READ_PIXELS:
        level_mpp = slide_mpp(reader) * ds
        raise InputError(
            f"a {size} px tile at {mpp:g} µm/px needs a {width}×{height} px read from level "
            f"{level} ({level_mpp:g} µm/px), more than {MAX_READ_PIXELS // 2**20} Mpx: use a "
            "finer --mpp or a slide with coarser pyramid levels",
            path=path,
        )
    try:
        with _quiet_tiatoolbox():
            window = reader.read_rect(
                (round(x0 * ds), round(y0 * ds)),
                (width, height),
                resolution=level,
                units="level",
                pad_mode="constant",
                pad_constant_values=OUTSIDE_VALUE,
            )
    except InputError:
        raise
    except Exception as exc:  # a codec error: the file is damaged where this tile lies
        message = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InputError(
            f"cannot decode the pixels of the {size} px tile at level-0 ({x:.0f}, {y:.0f}) "
            f"(level {level}): {message}; the slide file may be damaged",
            path=path,
        ) from None
    window = _as_rgb(np.asarray(window), path)
    if window.shape[:2] != (height, width):  # a reader that ignores the requested size
        raise InputError(
            f"reader returned {window.shape[1]}×{window.shape[0]} px for a "
            f"{width}×{height} px request at level {level}",
            path=path,
        )
    ox, oy = lx - x0, ly - y0  # tile corner inside the window, level pixels
    if scale >= 1 - _LEVEL_TOLERANCE:
        ix, iy = round(ox), round(oy)
        aligned = abs(ox - ix) < 1e-6 and abs(oy - iy) < 1e-6
        factor = round(scale)
        if scale == 1.0 and aligned:
            tile = window[iy : iy + size, ix : ix + size]
        elif aligned and abs(scale - factor) < 1e-9:
            # integer shrink on the grid: block means; OpenCV's area resize is exact here
            block = window[iy : iy + size * factor, ix : ix + size * factor]
            tile = cv2.resize(block, (size, size), interpolation=cv2.INTER_AREA)
        else:
            tile = _area_resample(window, ox, oy, scale, size)
    else:
        # enlarging: tile pixel centre (j + 0.5) maps to window index ox + (j + 0.5)·s - 0.5
        shift_x = ox + 0.5 * scale - 0.5
        shift_y = oy + 0.5 * scale - 0.5
        matrix = np.array([[scale, 0.0, shift_x], [0.0, scale, shift_y]])
        tile = cv2.warpAffine(
            window,
            matrix,
            (size, size),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
    if tile.shape != (size, size, 3):
        raise InputError(f"could not read a {size} px tile at ({x:g}, {y:g})", path=path)
    return np.ascontiguousarray(tile, dtype=np.uint8)
