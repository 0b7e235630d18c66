"""The cache file: its records, attributes, windows and reading (see the package docstring)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from histosynth.synthesis.cache.validate import (
    attribute_value,
    check_attributes,
    check_layout,
    check_storage,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.vae import scale_latents

FORMAT = "histosynth-feature-cache"
"""Value of the ``format`` attribute of every cache file."""

FORMAT_VERSION = 1
"""Version of the layout above; readers refuse newer files."""

STRINGS = {"tile_id": 256, "source": 1024, "kind": 16, "pixel_sha256": 64, "sample_sha256": 64}
"""Per-sample string datasets and their fixed lengths in utf-8 bytes (SWMR needs fixed)."""

ARRAYS = ("posterior", "rows", "mask")
STRING_CHUNK = 256
_HASH_PREFIX = b"histosynth-feature-cache-v1\n"

ProgressFn = Callable[[Iterable, "int | None"], Iterable]

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CacheInfo:
    """What a cache file holds (its attributes, and ``count`` complete samples).

    Attributes:
        tile_size: tile side, px; mpp: its resolution, µm/px.
        count: complete samples (an interrupted build's finished batches included).
        latent_channels, downsample: the VAE latent's channels and px per latent cell.
        scaling_factor, shift_factor: the VAE's latent scaling (``(z − shift) · scale``).
        vae_hash, encoder_hash: :func:`~histosynth.synthesis.adapters.base_weight_hash`
            of the VAE and of the encoder that made the features.
        encoder_crop: side of one encoder crop, px; rows: rows per tile; dim: row width.
        content_hash: sha256 over the samples in order (ids, kinds, pixel hashes, stored
            features) — the training-set checksum adapters record.
        complete: false while a build is unfinished (interrupted or running).
    """

    path: Path
    tile_size: int
    mpp: float
    count: int
    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float
    vae_hash: str
    encoder_hash: str
    encoder_crop: int
    rows: int
    dim: int
    content_hash: str
    model_id: str
    encoder_class: str = ""
    created: str = ""
    histosynth_version: str = ""
    complete: bool = True

    @property
    def grid(self) -> int:
        """Encoder crops per tile side."""
        return self.tile_size // self.encoder_crop


@dataclass
class CacheTile:
    """One tile to cache: uint8 RGB ``(H, W, 3)`` and its uint8 ``(H, W)`` 0/255 mask."""

    tile_id: str
    image: np.ndarray
    mask: np.ndarray
    source: str = ""
    kind: str = "vessel"


STATIC_ATTRS = (
    "tile_size",
    "mpp",
    "latent_channels",
    "downsample",
    "scaling_factor",
    "shift_factor",
    "vae_hash",
    "encoder_hash",
    "encoder_class",
    "encoder_crop",
    "rows",
    "dim",
    "model_id",
)
_FIELD_TYPES = {f.name: f.type for f in fields(CacheInfo)}


# --------------------------------------------------------------------------- small helpers


def pixel_sha256(image: np.ndarray) -> str:
    """Hex sha256 of a tile's uint8 RGB bytes (row-major ``(H, W, 3)``)."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).data).hexdigest()


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def fixed_strings(values: Sequence[str], size: int, what: str) -> np.ndarray:
    """utf-8 strings as a fixed-length bytes array; a longer one is an error."""
    encoded = [str(v).encode("utf-8") for v in values]
    for value in encoded:
        if len(value) > size:
            raise EngineError(f"longer than {size} utf-8 bytes", item=f"{what} {value[:60]!r}")
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", size))


def as_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def source_text(source: str, size: int = STRINGS["source"]) -> str:
    """A provenance string that fits ``size`` bytes: long ones keep their tail (the file)."""
    raw = source.encode("utf-8")
    if len(raw) <= size:
        return source
    return "…" + raw[-(size - 8) :].decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------- windows


def check_resolution(resolution: int | None, tile_size: int, crop: int, downsample: int = 8) -> int:
    """The training side in px: ``tile_size`` for ``None``; else a multiple of the
    encoder ``crop`` (and of the VAE ``downsample``) no larger than ``tile_size``.

    Raises:
        EngineError: any other value.
    """
    if resolution is None:
        return int(tile_size)
    res = int(resolution)
    if res <= 0 or res > tile_size or res % crop or res % downsample:
        raise EngineError(
            f"resolution {resolution} px: expected a multiple of the encoder crop ({crop} px) "
            f"and of {downsample}, at most the cached tile size ({tile_size} px)",
            item="resolution",
        )
    return res


def draw_window(
    tile_size: int, resolution: int, crop: int, generator: torch.Generator | None
) -> tuple[int, int]:
    """Top-left corner (px) of a ``resolution``² window on the crop grid of a tile.

    Offsets are multiples of ``crop``, uniform over the window positions, drawn with one
    ``torch.randint`` call on ``generator``; nothing is drawn when the window is the tile.
    """
    cells, k = tile_size // crop, resolution // crop
    if k >= cells:
        return 0, 0
    top, left = torch.randint(0, cells - k + 1, (2,), generator=generator).tolist()
    return int(top) * crop, int(left) * crop


def window_rows(tile_size: int, resolution: int, crop: int, top: int, left: int) -> list[int]:
    """Indices (row-major over the tile's crop grid) of the crops inside a window, in the
    window's own row-major order: the rows an encoder gives for the window's pixels.

    Raises:
        EngineError: a window off the crop grid or outside the tile.
    """
    cells, k = tile_size // crop, resolution // crop
    if (
        top % crop
        or left % crop
        or not (0 <= top <= tile_size - resolution)
        or not (0 <= left <= tile_size - resolution)
    ):
        raise EngineError(
            f"window at ({left}, {top}) px of side {resolution} is not on the {crop} px grid "
            f"of a {tile_size} px tile",
            item="window",
        )
    r0, c0 = top // crop, left // crop
    return [(r0 + i) * cells + c0 + j for i in range(k) for j in range(k)]


def _latents(
    posterior: Tensor, scaling_factor: float, shift_factor: float, generator: torch.Generator | None
) -> Tensor:
    """``scale_latents(μ + σ·ε)`` of a float32 posterior ``[2·C, h, w]``; ε from ``generator``."""
    mean, std = posterior.chunk(2, dim=0)
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return scale_latents(mean + std * eps, scaling_factor, shift_factor)


def sample_dict(
    posterior: Tensor,
    rows: Tensor,
    mask: np.ndarray,
    tile_id: str,
    index: int,
    window: tuple[int, int, int, int],
    factors: tuple[float, float],
    generator: torch.Generator | None,
) -> dict[str, Any]:
    """One training sample from full-tile features and a window (top, left, side, down)."""
    top, left, side, down = window
    lt, ll, ls = top // down, left // down, side // down
    window_posterior = posterior[:, lt : lt + ls, ll : ll + ls].float()
    return {
        "latents": _latents(window_posterior, *factors, generator),
        "rows": rows.float(),
        "mask": torch.from_numpy(mask[top : top + side, left : left + side].copy()),
        "tile_id": tile_id,
        "index": int(index),
    }


# --------------------------------------------------------------------------- reading


#: How long a reader waits for a writer that holds the file's lock while it creates the
#: file or switches it to SWMR mode (a fraction of a second in practice), s.
LOCK_WAIT = 10.0


def h5_read(path: Path) -> h5py.File:
    """The file opened read-only: plainly (HDF5 then checks its length), or in SWMR read
    mode when a writer holds it or was killed (its consistency flags are set). While a
    writer holds the exclusive lock of a file it is creating, the open is retried for up
    to :data:`LOCK_WAIT` s."""
    import time

    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return _h5_read_once(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _h5_read_once(path: Path) -> h5py.File:
    # checked on a handle of its own: opening every dataset caches its header, and an SWMR
    # reader would then see the extents of that moment after a later "committed" count
    with _h5_open(path) as probe:
        refuse_links_out(probe, path)
    return _h5_open(path)


def _h5_open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except BlockingIOError:
        raise
    except OSError as err:
        # only for the flags: SWMR readers skip the length check and retry unreadable
        # metadata for a long time, so a truncated file must fail the plain open above
        if not is_writer_flag_error(err):
            raise
        return h5py.File(path, "r", swmr=True)


def refuse_links_out(handle: h5py.Group, path: Path) -> None:
    """Refuse a cache whose data could come from elsewhere: an external or soft link, a
    dataset with external storage or a virtual dataset (histosynth writes none; each
    would let a crafted cache read any file, or loop).

    Raises:
        EngineError: naming the file and the object.
    """
    stack = [handle]
    while stack:
        group = stack.pop()
        try:
            for name in group:
                _refuse_link_out(group, name, path, stack)
        except EngineError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
            raise EngineError(
                f"cannot read the cache: an object under {group.name} is unreadable, "
                f"truncated / corrupt ({short_error(err)})",
                path=path,
            ) from err


def _refuse_link_out(group: h5py.Group, name: str, path: Path, stack: list) -> None:
    link = group.get(name, getlink=True)
    where = f"{group.name.rstrip('/')}/{name}"
    if not isinstance(link, h5py.HardLink):
        kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a link"
        raise EngineError(f"{where} is {kind}; a cache holds its own data only", path=path)
    item = group[name]
    if isinstance(item, h5py.Group):
        stack.append(item)
    elif isinstance(item, h5py.Dataset) and (item.external or item.is_virtual):
        raise EngineError(f"{where} stores its data outside the file; refused", path=path)


def is_writer_flag_error(err: OSError) -> bool:
    """Whether HDF5 refused a file because a writer holds it or was killed holding it."""
    return "already open for write" in str(err)


@contextmanager
def open_read(path: Path) -> Iterator[h5py.File]:
    """The cache file opened for reading, as an :class:`EngineError` naming it if it fails."""
    if not path.is_file():
        raise EngineError("no such cache file", path=path)
    handle = read_handle(path)
    try:
        yield handle
    finally:
        handle.close()


def read_handle(path: Path) -> h5py.File:
    """:func:`h5_read`, its failures as an :class:`EngineError` naming the file."""
    try:
        return h5_read(path)
    except OSError as err:
        raise EngineError(
            f"cannot read the cache: not an HDF5 file, or truncated / corrupt ({short_error(err)})",
            path=path,
        ) from err


def _attr(handle: h5py.File, name: str, path: Path, default: Any = None) -> Any:
    """Attribute ``name`` as its :class:`CacheInfo` field's type (checked, see
    :func:`~histosynth.synthesis.cache.validate.attribute_value`); ``default`` when it
    is missing and a default is given."""
    if name not in handle.attrs:
        if default is not None:
            return default
        raise EngineError(f"not a complete cache: attribute {name!r} is missing", path=path)
    try:
        value = handle.attrs[name]
    except (OSError, TypeError, ValueError) as err:
        raise EngineError(
            f"attribute {name!r} is unreadable ({short_error(err)})", path=path
        ) from err
    kind = "int" if name in ("format_version", "count") else _FIELD_TYPES.get(name)
    return attribute_value(value, kind, name, path)


def _count(handle: h5py.File, path: Path) -> int:
    """The ``committed`` count, read before any other dataset is opened: an SWMR reader
    keeps the extents a dataset had when it was first opened, so a count read later
    could exceed them."""
    try:
        item = handle.get("committed")
        ok = isinstance(item, h5py.Dataset) and item.shape == (1,) and item.dtype.kind in "iu"
        count = int(item[0]) if ok else -1
    except (OSError, TypeError, ValueError) as err:
        raise EngineError(f"corrupt cache: {short_error(err)}", path=path) from err
    if not ok:
        raise EngineError(
            "not a complete cache: 'committed' is not one integer (the count of samples)",
            path=path,
        )
    return count


def _committed(handle: h5py.File, path: Path, count: int) -> int:
    """Complete samples: ``count`` (from :func:`_count`), when every per-sample dataset
    holds at least that many and the last of them reads."""
    try:
        lengths = {name: handle[name].shape[0] for name in (*ARRAYS, *STRINGS)}
    except (KeyError, OSError, ValueError, IndexError) as err:
        raise EngineError(f"corrupt cache: {short_error(err)}", path=path) from err
    short = {k: v for k, v in lengths.items() if v < count}
    if count < 0 or short:
        raise EngineError(
            f"corrupt cache: {count} samples committed but "
            + ", ".join(f"{k} holds {v}" for k, v in short.items()),
            path=path,
        )
    if count:  # the last sample was written last: a cut-off file cannot read it
        try:
            for name in (*ARRAYS, *STRINGS):
                handle[name][count - 1]
        except (OSError, ValueError) as err:
            raise EngineError(
                f"cannot read the cache: truncated / corrupt (sample {count - 1} of {name} is "
                f"unreadable: {short_error(err)})",
                path=path,
            ) from err
    return count


def digest_of_samples(digests: Iterable[bytes]) -> str:
    """The content hash: sha256 over per-sample hex digests (64 ascii bytes each, in order)."""
    digest = hashlib.sha256(_HASH_PREFIX)
    for chunk in digests:
        digest.update(chunk)
    return digest.hexdigest()


def content_digest(handle: h5py.File, count: int) -> str:
    """:func:`digest_of_samples` of the first ``count`` stored per-sample digests."""
    data = handle["sample_sha256"]
    return digest_of_samples(
        np.asarray(data[start : min(count, start + 65536)]).tobytes()
        for start in range(0, count, 65536)
    )


def info_of_handle(handle: h5py.File, path: Path) -> CacheInfo:
    """The header of an open cache, checked against itself (see
    :mod:`~histosynth.synthesis.cache.validate`: attribute types and ranges, dataset
    dtypes / shapes / stored bytes) — O(1) metadata, plus the content hash recomputed
    from the stored per-sample digests (64 B a sample), which must equal the stored
    ``content_hash`` of a complete cache.

    Raises:
        EngineError: naming the file and the attribute or dataset at fault.
    """
    try:
        return _info_of_handle(handle, path)
    except EngineError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        # what HDF5 raises on metadata damaged past the checks above
        raise EngineError(
            f"cannot read the cache: truncated / corrupt ({short_error(err)})", path=path
        ) from err


def _info_of_handle(handle: h5py.File, path: Path) -> CacheInfo:
    if _attr(handle, "format", path, default="") != FORMAT:
        raise EngineError(
            f"not a histosynth feature cache (no format attribute {FORMAT!r})", path=path
        )
    version = _attr(handle, "format_version", path)
    if version > FORMAT_VERSION or version < 1:
        raise EngineError(
            f"cache format {version} is not one this histosynth reads (1 to "
            f"{FORMAT_VERSION}); upgrade histosynth",
            path=path,
        )
    values = {name: _attr(handle, name, path) for name in STATIC_ATTRS}
    check_attributes(values, path)
    count = _count(handle, path)
    shapes = sample_shapes(SimpleNamespace(**values))
    check_layout(handle, shapes, STRINGS, path)
    count = _committed(handle, path, count)
    check_storage(handle, shapes, count, path)
    computed = content_digest(handle, count)
    stored = _attr(handle, "content_hash", path, default="")
    complete = _attr(handle, "count", path, default=-1) == count and len(stored) == 64
    if complete and stored != computed:
        raise EngineError(
            f"the stored content hash {stored[:70]!r} is not the one of its samples' "
            f"digests ({computed[:16]}…); rebuild the cache",
            path=path,
        )
    return CacheInfo(
        path=path,
        count=count,
        content_hash=computed,
        created=_attr(handle, "created", path, default=""),
        histosynth_version=_attr(handle, "histosynth_version", path, default=""),
        complete=complete,
        **values,
    )


def read_cache_info(path: str | os.PathLike) -> CacheInfo:
    """The attributes of a cache file and its number of complete samples.

    Raises:
        EngineError: naming the file, when it is missing, not a cache, truncated or corrupt.
    """
    path = Path(path)
    with open_read(path) as handle:
        return info_of_handle(handle, path)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of a cache's complete samples in order, from their stored digests
    (64 bytes per sample; the header checked as :func:`read_cache_info` does). Training
    recomputes the digests themselves (``CacheDataset.verified_content_hash``)."""
    path = Path(path)
    with open_read(path) as handle:
        return info_of_handle(handle, path).content_hash


def _texts(handle: h5py.File, name: str, count: int, path: Path) -> list[str]:
    """The first ``count`` values of string dataset ``name``; non-utf-8 ones refused."""
    out = []
    try:
        values = handle[name][:count]
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise EngineError(
            f"cannot read the cache: dataset {name!r} is truncated / corrupt "
            f"({short_error(err)})",
            path=path,
        ) from err
    for index, raw in enumerate(values):
        try:
            out.append(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError:
            raise EngineError(
                f"{name} is not utf-8 text ({bytes(raw)[:40]!r})", item=f"sample {index}",
                path=path,
            ) from None
    return out


def cached_tile_ids(path: str | os.PathLike) -> set[str]:
    """Ids of the complete samples of a cache (to skip reading tiles already cached)."""
    path = Path(path)
    with open_read(path) as handle:
        count = info_of_handle(handle, path).count
        return set(_texts(handle, "tile_id", count, path))


def id_hashes(path: Path) -> dict[str, str]:
    with open_read(path) as handle:
        count = info_of_handle(handle, path).count
        ids = _texts(handle, "tile_id", count, path)
        shas = _texts(handle, "pixel_sha256", count, path)
        return dict(zip(ids, shas, strict=True))


def sample_shapes(info: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-sample shape and dtype of ``posterior``, ``rows`` and ``mask`` of a cache
    described by ``info`` (a :class:`CacheInfo` or anything with its fields)."""
    side = info.tile_size // info.downsample
    return {
        "posterior": ((2 * info.latent_channels, side, side), "float16"),
        "rows": ((info.rows, info.dim), "float16"),
        "mask": ((info.tile_size, info.tile_size), "uint8"),
    }


def checked_tile(tile: CacheTile, tile_size: int) -> CacheTile:
    """The tile with a validated image and a 0/255 uint8 mask."""
    image, mask = np.asarray(tile.image), np.asarray(tile.mask)
    item = f"tile {tile.tile_id}"
    if image.dtype != np.uint8 or image.shape != (tile_size, tile_size, 3):
        raise EngineError(
            f"expected a uint8 RGB image of {tile_size}×{tile_size} px, found "
            f"{image.dtype} {image.shape}",
            item=item,
        )
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8 or mask.shape != (tile_size, tile_size):
        raise EngineError(
            f"expected a uint8 mask of {tile_size}×{tile_size} px, found {mask.dtype} {mask.shape}",
            item=item,
        )
    if not np.isin(mask, (0, 255)).all():
        raise EngineError("expected mask values 0 and 255 only", item=item)
    if not tile.tile_id or not tile.kind:
        raise EngineError("a tile needs a non-empty id and kind", item=item)
    fixed_strings([tile.tile_id], STRINGS["tile_id"], "tile id")
    fixed_strings([tile.kind], STRINGS["kind"], "kind")
    return CacheTile(
        tile.tile_id,
        np.ascontiguousarray(image),
        np.ascontiguousarray(mask),
        str(tile.source),
        str(tile.kind),
    )
