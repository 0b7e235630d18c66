"""The feature cache: VAE posteriors and conditioning rows of training tiles, in HDF5.

Training re-encodes the same tiles every epoch; the cache encodes each tile once. Per
sample it stores the VAE posterior (``mean`` and ``std``, unscaled, float16), the encoder
rows (float16), the vessel mask and the tile's provenance; at training time
:class:`CacheDataset` draws ``z = μ + σ·ε`` (so the encoder's stochasticity is kept) and
scales it into the denoiser's space. :class:`OnTheFlyDataset` gives the same samples by
encoding at every read: the baseline without a cache.

File layout (one HDF5 file, ``libver="latest"``)::

    posterior     float16 [N, 2·C, H/8, W/8]   cat(mean, std), one sample per chunk
    rows          float16 [N, rows, dim]       row-major over the grid of crop² crops
    mask          uint8   [N, H, W]            0 / 255 (lzf-compressed)
    tile_id, source, kind, pixel_sha256, sample_sha256   fixed-length utf-8 strings [N]
    committed     int64   [1]                  number of complete samples
    attributes    format, format_version, tile_size (px), mpp (µm/px), latent_channels,
                  downsample, scaling_factor, shift_factor, vae_hash, encoder_hash,
                  encoder_class, encoder_crop (px), rows, dim, model_id, created,
                  histosynth_version, count, content_hash

Crash safety: a build appends in batches with HDF5's single-writer/multiple-reader mode
(SWMR). Each batch is written and flushed before ``committed`` grows, so a build killed
at any moment leaves a file that readers open (in SWMR read mode) with every finished
batch; readers trust only the first ``committed`` samples. Resuming such a file copies its
complete samples into a fresh file first (HDF5 cannot reopen a killed writer's file for
writing). The ``count`` and ``content_hash`` attributes are written when a build ends;
``committed`` and the per-sample digests are the truth, so :func:`read_cache_info` is
right for an interrupted cache too. One writer at a time: a second build of the same file
is refused while the first runs.

Example:
    >>> engine = load_engine("tiny")                                  # doctest: +SKIP
    >>> tiles = [CacheTile("t0", image, mask, source="slide.svs")]    # doctest: +SKIP
    >>> info = build_cache("vessels.h5", tiles, codec=engine.codec, encoder=engine.encoder,
    ...                    tile_size=256, mpp=0.5)                    # doctest: +SKIP
    >>> CacheDataset("vessels.h5", resolution=128)[0]["latents"].shape  # doctest: +SKIP
    torch.Size([16, 16, 16])
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from histosynth.synthesis.adapters import _histosynth_version, base_weight_hash
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import GridEncoder
from histosynth.synthesis.models.vae import LatentCodec, scale_latents

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CacheDataset",
    "CacheInfo",
    "CacheTile",
    "OnTheFlyDataset",
    "build_cache",
    "cached_tile_ids",
    "check_resolution",
    "content_hash",
    "draw_window",
    "pixel_sha256",
    "read_cache_info",
    "window_rows",
]

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


_STATIC_ATTRS = (
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


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fixed(values: Sequence[str], size: int, what: str) -> np.ndarray:
    """utf-8 strings as a fixed-length bytes array; a longer one is an error."""
    encoded = [str(v).encode("utf-8") for v in values]
    for value in encoded:
        if len(value) > size:
            raise EngineError(f"longer than {size} utf-8 bytes", item=f"{what} {value[:60]!r}")
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", size))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _source_text(source: str, size: int = STRINGS["source"]) -> str:
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
    if top % crop or left % crop or not (0 <= top <= tile_size - resolution) or not (
        0 <= left <= tile_size - resolution
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


def _sample_dict(
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


def _h5_read(path: Path) -> h5py.File:
    """The file opened read-only: plainly (HDF5 then checks its length), or in SWMR read
    mode when a writer holds it or was killed (its consistency flags are set)."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        # only for the flags: SWMR readers skip the length check and retry unreadable
        # metadata for a long time, so a truncated file must fail the plain open above
        if not _writer_flags(err):
            raise
        return h5py.File(path, "r", swmr=True)


def _writer_flags(err: OSError) -> bool:
    """Whether HDF5 refused a file because a writer holds it or was killed holding it."""
    return "already open for write" in str(err)


@contextmanager
def _open_read(path: Path) -> Iterator[h5py.File]:
    """The cache file opened for reading, as an :class:`EngineError` naming it if it fails."""
    if not path.is_file():
        raise EngineError("no such cache file", path=path)
    try:
        handle = _h5_read(path)
    except OSError as err:
        raise EngineError(
            f"cannot read the cache: not an HDF5 file, or truncated / corrupt ({_short(err)})",
            path=path,
        ) from err
    try:
        yield handle
    finally:
        handle.close()


def _attr(handle: h5py.File, name: str, path: Path) -> Any:
    if name not in handle.attrs:
        raise EngineError(f"not a complete cache: attribute {name!r} is missing", path=path)
    value = handle.attrs[name]
    kind = _FIELD_TYPES.get(name)
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return _text(value)
    except (TypeError, ValueError) as err:
        raise EngineError(f"attribute {name!r} is unreadable ({_short(err)})", path=path) from err


def _committed(handle: h5py.File, path: Path) -> int:
    """Complete samples; every per-sample dataset must hold at least that many."""
    try:
        count = int(handle["committed"][0])
        lengths = {name: handle[name].shape[0] for name in (*ARRAYS, *STRINGS)}
    except (KeyError, OSError, ValueError, IndexError) as err:
        raise EngineError(f"corrupt cache: {_short(err)}", path=path) from err
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
                f"unreadable: {_short(err)})",
                path=path,
            ) from err
    return count


def _digest(handle: h5py.File, count: int) -> str:
    """sha256 over the first ``count`` per-sample digests (64 bytes each, in order)."""
    digest = hashlib.sha256(_HASH_PREFIX)
    data = handle["sample_sha256"]
    for start in range(0, count, 65536):
        digest.update(np.asarray(data[start : min(count, start + 65536)]).tobytes())
    return digest.hexdigest()


def _info(handle: h5py.File, path: Path) -> CacheInfo:
    if _text(handle.attrs.get("format", b"")) != FORMAT:
        raise EngineError(f"not a histosynth feature cache (no format attribute {FORMAT!r})",
                          path=path)
    version = _attr(handle, "format_version", path)
    if int(version) > FORMAT_VERSION:
        raise EngineError(
            f"cache format {version} is newer than this histosynth reads ({FORMAT_VERSION}); "
            "upgrade histosynth",
            path=path,
        )
    values = {name: _attr(handle, name, path) for name in _STATIC_ATTRS}
    count = _committed(handle, path)
    stored = _text(handle.attrs.get("content_hash", b""))
    complete = int(handle.attrs.get("count", -1)) == count and len(stored) == 64
    return CacheInfo(
        path=path,
        count=count,
        content_hash=stored if complete else _digest(handle, count),
        created=_text(handle.attrs.get("created", b"")),
        histosynth_version=_text(handle.attrs.get("histosynth_version", b"")),
        complete=complete,
        **values,
    )


def read_cache_info(path: str | os.PathLike) -> CacheInfo:
    """The attributes of a cache file and its number of complete samples.

    Raises:
        EngineError: naming the file, when it is missing, not a cache, truncated or corrupt.
    """
    path = Path(path)
    with _open_read(path) as handle:
        return _info(handle, path)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of a cache's complete samples in order; cheap (64 bytes per sample)."""
    path = Path(path)
    with _open_read(path) as handle:
        return _digest(handle, _committed(handle, path))


def cached_tile_ids(path: str | os.PathLike) -> set[str]:
    """Ids of the complete samples of a cache (to skip reading tiles already cached)."""
    path = Path(path)
    with _open_read(path) as handle:
        count = _committed(handle, path)
        return {_text(v) for v in handle["tile_id"][:count]}


def _id_hashes(path: Path) -> dict[str, str]:
    with _open_read(path) as handle:
        count = _committed(handle, path)
        ids = handle["tile_id"][:count]
        shas = handle["pixel_sha256"][:count]
        return {_text(i): _text(s) for i, s in zip(ids, shas, strict=True)}


# --------------------------------------------------------------------------- writing


def _expected_info(
    path: Path,
    codec: LatentCodec,
    encoder: GridEncoder,
    tile_size: int,
    mpp: float,
    model_id: str,
) -> CacheInfo:
    """What a cache of these models at ``tile_size`` px / ``mpp`` µm/px must say."""
    crop, down = int(encoder.crop), int(codec.downsample)
    if tile_size <= 0 or tile_size % crop or tile_size % down:
        raise EngineError(
            f"tile size {tile_size} px: expected a multiple of the encoder crop ({crop} px, "
            f"fixed by the model's magnification) and of the VAE's ×{down} down-sampling",
            item="tile_size",
        )
    if not mpp > 0:
        raise EngineError(f"expected a positive resolution in µm/px, got {mpp}", item="mpp")
    return CacheInfo(
        path=path,
        tile_size=int(tile_size),
        mpp=float(mpp),
        count=0,
        latent_channels=int(codec.latent_channels),
        downsample=down,
        scaling_factor=float(codec.scaling_factor),
        shift_factor=float(codec.shift_factor),
        vae_hash=base_weight_hash(codec.vae),
        encoder_hash=base_weight_hash(encoder),
        encoder_crop=crop,
        rows=int(encoder.rows(tile_size, tile_size)),
        dim=int(encoder.dim),
        content_hash="",
        model_id=str(model_id),
        encoder_class=type(encoder).__name__,
    )


def _check_compatible(existing: CacheInfo, expected: CacheInfo) -> None:
    """A resumed cache must come from the same models at the same tile size and mpp."""
    keys = ("vae_hash", "encoder_hash", "tile_size", "mpp", "latent_channels", "encoder_crop",
            "rows", "dim", "scaling_factor", "shift_factor")
    for key in keys:
        old, new = getattr(existing, key), getattr(expected, key)
        same = np.isclose(old, new, rtol=1e-9) if isinstance(old, float) else old == new
        if not same:
            raise EngineError(
                f"cannot resume: the cache was built with {key} {old}, this build has {new}; "
                "build a new cache file",
                path=existing.path,
            )


def _sample_shapes(info: CacheInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    side = info.tile_size // info.downsample
    return {
        "posterior": ((2 * info.latent_channels, side, side), "float16"),
        "rows": ((info.rows, info.dim), "float16"),
        "mask": ((info.tile_size, info.tile_size), "uint8"),
    }


def _create_file(path: Path, info: CacheInfo) -> None:
    """An empty cache at ``path``, written beside it and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with h5py.File(tmp, "w", libver="latest") as handle:
            for name, (shape, dtype) in _sample_shapes(info).items():
                handle.create_dataset(
                    name, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape),
                    dtype=dtype, compression="lzf" if name == "mask" else None,
                )
            for name, size in STRINGS.items():
                handle.create_dataset(
                    name, shape=(0,), maxshape=(None,), chunks=(STRING_CHUNK,),
                    dtype=h5py.string_dtype("utf-8", size),
                )
            handle.create_dataset("committed", data=np.zeros(1, dtype=np.int64))
            handle.attrs["format"] = FORMAT
            handle.attrs["format_version"] = FORMAT_VERSION
            for name in _STATIC_ATTRS:
                handle.attrs[name] = getattr(info, name)
            handle.attrs["created"] = info.created or datetime.now(UTC).isoformat(
                timespec="seconds")
            handle.attrs["histosynth_version"] = info.histosynth_version or _histosynth_version()
            handle.attrs.create("count", 0, dtype=np.int64)
            handle.attrs.create("content_hash", b"", dtype=h5py.string_dtype("ascii", 64))
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


_WRITING: set[str] = set()
"""Cache files this process is writing (POSIX locks do not exclude their own process)."""


def _lock(path: Path) -> int:
    """An exclusive POSIX record lock on the cache file: one writer at a time. (HDF5's own
    ``flock`` locks are another kind, so readers still open the file.) Returns the fd."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise EngineError("another process is writing this cache; wait for it to finish",
                          path=path) from err
    return fd


def _open_swmr_writer(path: Path) -> h5py.File:
    """The file opened straight into SWMR write mode (never a non-SWMR writer's state)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    flags = h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


def _recover(path: Path) -> None:
    """Rewrite an interrupted cache with only its complete samples (copy-on-resume)."""
    with _open_read(path) as src:
        info = _info(src, path)
        tmp = path.with_name(f".{path.name}.recover-{uuid.uuid4().hex[:8]}")
        try:
            _create_file(tmp, info)
            with h5py.File(tmp, "r+", libver="latest") as dst:
                for name in (*ARRAYS, *STRINGS):
                    dst[name].resize(info.count, axis=0)
                    step = STRING_CHUNK if name in STRINGS else 16
                    for start in range(0, info.count, step):
                        stop = min(info.count, start + step)
                        dst[name][start:stop] = src[name][start:stop]
                dst["committed"][0] = info.count
            os.replace(tmp, path)
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()


def _remove_stale_copies(path: Path) -> None:
    """Temporary siblings left by a build killed while creating or recovering ``path``
    (called by the lock holder, the only one who makes them)."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.recover-*"):
        for stale in path.parent.glob(pattern):
            with suppress(OSError):
                stale.unlink()


class _Writer:
    """Appends encoded batches to a cache file in SWMR mode, holding the writer lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key = str(path.resolve())
        if self.key in _WRITING:
            raise EngineError("this process is already writing this cache", path=path)
        self.fd = _lock(path)
        _WRITING.add(self.key)
        try:
            _remove_stale_copies(path)
            self.handle = self._open()
        except BaseException:
            self._release()
            raise
        self.count = int(self.handle["committed"][0])

    def _open(self) -> h5py.File:
        try:
            handle = _open_swmr_writer(self.path)
        except OSError as err:
            if not _writer_flags(err):
                raise EngineError(f"cannot open the cache for writing ({_short(err)}); close "
                                  "what else holds it open", path=self.path) from err
            return self._recovered()  # a killed writer's file: keep the complete samples
        committed = int(handle["committed"][0])
        if any(handle[name].shape[0] != committed for name in (*ARRAYS, *STRINGS)):
            handle.close()  # a batch that failed half-way: drop it
            return self._recovered()
        return handle

    def _recovered(self) -> h5py.File:
        _recover(self.path)
        os.close(self.fd)  # the lock was on the replaced file
        self.fd = -1
        self.fd = _lock(self.path)
        return _open_swmr_writer(self.path)

    def _release(self) -> None:
        _WRITING.discard(self.key)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def append(self, batch: _Encoded) -> None:
        """Write one batch, flush it, then count it (the commit point)."""
        n, b = self.count, len(batch.tile_ids)
        columns: dict[str, np.ndarray] = {
            "posterior": batch.posterior,
            "rows": batch.rows,
            "mask": batch.masks,
            "tile_id": _fixed(batch.tile_ids, STRINGS["tile_id"], "tile id"),
            "source": _fixed(batch.sources, STRINGS["source"], "source"),
            "kind": _fixed(batch.kinds, STRINGS["kind"], "kind"),
            "pixel_sha256": _fixed(batch.pixel_shas, 64, "pixel sha256"),
            "sample_sha256": _fixed(batch.sample_shas, 64, "sample sha256"),
        }
        for name, values in columns.items():
            self.handle[name].resize(n + b, axis=0)
            self.handle[name][n : n + b] = values
        self.handle.flush()
        self.handle["committed"][0] = n + b
        self.handle.flush()
        self.count = n + b

    def finish(self) -> None:
        """Record ``count`` and ``content_hash`` as attributes (same-size values, in place)."""
        self.handle.attrs.modify("count", np.int64(self.count))
        self.handle.attrs.modify("content_hash", _digest(self.handle, self.count).encode())
        self.handle.flush()

    def close(self) -> None:
        try:
            self.handle.close()
        finally:
            self._release()


@dataclass
class _Encoded:
    tile_ids: list[str]
    sources: list[str]
    kinds: list[str]
    pixel_shas: list[str]
    sample_shas: list[str]
    posterior: np.ndarray  # float16 [B, 2C, h, w]
    rows: np.ndarray  # float16 [B, rows, dim]
    masks: np.ndarray  # uint8 [B, H, W]


def _sample_sha(tile_id: str, kind: str, pixel_sha: str, *arrays: np.ndarray) -> str:
    digest = hashlib.sha256(f"{tile_id}\0{kind}\0{pixel_sha}\0".encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _encode(
    batch: list[tuple[CacheTile, str]], codec: LatentCodec, encoder: GridEncoder, rows: int
) -> _Encoded:
    """VAE posteriors and encoder rows of a batch, as the float16 arrays stored."""
    images = np.stack([tile.image for tile, _ in batch])
    mean, std = codec.encode_posterior(images)
    posterior = torch.cat([mean, std], dim=1).float().cpu().numpy().astype("<f2")
    features = encoder.encode(images).float().cpu().numpy().astype("<f2")
    if features.shape[1] != rows:
        raise EngineError(f"the encoder gave {features.shape[1]} rows per tile, expected {rows}")
    masks = np.stack([tile.mask for tile, _ in batch])
    for k, (tile, _) in enumerate(batch):
        if not (np.isfinite(posterior[k]).all() and np.isfinite(features[k]).all()):
            raise EngineError("features are not finite in float16", item=f"tile {tile.tile_id}")
    return _Encoded(
        tile_ids=[t.tile_id for t, _ in batch],
        sources=[_source_text(t.source) for t, _ in batch],
        kinds=[t.kind for t, _ in batch],
        pixel_shas=[sha for _, sha in batch],
        sample_shas=[
            _sample_sha(t.tile_id, t.kind, sha, posterior[k], features[k], masks[k])
            for k, (t, sha) in enumerate(batch)
        ],
        posterior=posterior,
        rows=features,
        masks=masks,
    )


def _checked_tile(tile: CacheTile, tile_size: int) -> CacheTile:
    """The tile with a validated image and a 0/255 uint8 mask."""
    image, mask = np.asarray(tile.image), np.asarray(tile.mask)
    item = f"tile {tile.tile_id}"
    if image.dtype != np.uint8 or image.shape != (tile_size, tile_size, 3):
        raise EngineError(f"expected a uint8 RGB image of {tile_size}×{tile_size} px, found "
                          f"{image.dtype} {image.shape}", item=item)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8 or mask.shape != (tile_size, tile_size):
        raise EngineError(f"expected a uint8 mask of {tile_size}×{tile_size} px, found "
                          f"{mask.dtype} {mask.shape}", item=item)
    if not np.isin(mask, (0, 255)).all():
        raise EngineError("expected mask values 0 and 255 only", item=item)
    if not tile.tile_id or not tile.kind:
        raise EngineError("a tile needs a non-empty id and kind", item=item)
    _fixed([tile.tile_id], STRINGS["tile_id"], "tile id")
    _fixed([tile.kind], STRINGS["kind"], "kind")
    return CacheTile(tile.tile_id, np.ascontiguousarray(image), np.ascontiguousarray(mask),
                     str(tile.source), str(tile.kind))


def _new_tiles(
    tiles: Iterable[CacheTile], known: dict[str, str], tile_size: int
) -> Iterator[tuple[CacheTile, str]]:
    """Validated tiles not yet cached, with their pixel sha256; a known id must have the
    same pixels as its cached sample (else the source changed under the cache)."""
    for raw in tiles:
        tile = _checked_tile(raw, tile_size)
        sha = pixel_sha256(tile.image)
        if tile.tile_id in known:
            if known[tile.tile_id] != sha:
                raise EngineError(
                    "is already cached with other pixels (its source changed since); build a "
                    "new cache, or give the tile a new id",
                    item=f"tile {tile.tile_id}",
                )
            continue
        known[tile.tile_id] = sha
        yield tile, sha


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prepare(path: Path, expected: CacheInfo, resume: bool) -> dict[str, str]:
    """Check the target; return the cached ids → pixel sha256 (empty for a new file)."""
    if path.is_dir():
        raise EngineError("expected a cache file, found a folder", path=path)
    if not path.exists():
        return {}
    if not resume:
        raise EngineError("the cache file exists; resume it (--resume) or choose another file",
                          path=path)
    _check_compatible(read_cache_info(path), expected)
    return _id_hashes(path)


def build_cache(
    path: str | os.PathLike,
    tiles: Iterable[CacheTile],
    *,
    codec: LatentCodec,
    encoder: GridEncoder,
    tile_size: int,
    mpp: float,
    model_id: str = "",
    resume: bool = False,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> CacheInfo:
    """Encode ``tiles`` (``tile_size`` px at ``mpp`` µm/px) into the cache file ``path``.

    Each tile's VAE posterior (``codec.encode_posterior``) and rows (``encoder.encode``:
    ``(tile_size / encoder.crop)²`` rows, whatever the model's own tile size) are stored
    in float16, ``batch_size`` tiles per commit. With ``resume`` an existing cache of the
    same VAE, encoder, tile size and mpp is continued: tiles whose id it holds are skipped
    (their pixels must not have changed). ``progress(items, total)`` wraps the tiles
    (``total`` is ``len(tiles)`` when known). The file is created with the first batch,
    so no tile means no file.

    Raises:
        EngineError: a tile size that is not a multiple of the encoder crop and of 8; an
            existing file without ``resume``; a cache of other models or settings; a
            truncated or corrupt file; a malformed tile; no tile at all for a new file.
    """
    path = Path(path)
    if batch_size < 1:
        raise EngineError(f"expected a batch size >= 1, got {batch_size}", item="batch_size")
    expected = _expected_info(path, codec, encoder, tile_size, mpp, model_id)
    known = _prepare(path, expected, resume)
    if progress is not None:
        tiles = progress(tiles, len(tiles) if isinstance(tiles, Sized) else None)
    writer: _Writer | None = None
    try:
        for batch in _batches(_new_tiles(tiles, known, tile_size), batch_size):
            encoded = _encode(batch, codec, encoder, expected.rows)
            if writer is None:
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _create_file(path, expected)
                writer = _Writer(path)
            writer.append(encoded)
        if writer is None:
            if not path.exists():
                raise EngineError("no tiles to cache", path=path)
            if read_cache_info(path).complete:
                return read_cache_info(path)
            writer = _Writer(path)
        writer.finish()
    finally:
        if writer is not None:
            writer.close()
    return read_cache_info(path)


# --------------------------------------------------------------------------- datasets


def _check_indices(indices: Sequence[int] | None, count: int, path: Path) -> list[int]:
    if indices is None:
        return list(range(count))
    chosen = [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise EngineError(f"indices {bad[:5]} are outside the cache's {count} samples",
                          path=path, item="indices")
    return chosen


def _worker_seed(seed: int) -> int | None:
    """A per-worker, per-epoch seed inside a DataLoader worker (None in the main process)."""
    worker = torch.utils.data.get_worker_info()
    if worker is None:
        return None
    return int(np.random.SeedSequence([int(seed), int(worker.seed)]).generate_state(1)[0])


class _OwnGenerator:
    """The dataset's own generator, reseeded once in each DataLoader worker so that workers
    (and epochs) draw different noise; picklable (the generator is rebuilt on unpickling)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._owner: tuple[int, int | None] = (os.getpid(), None)

    def get(self) -> torch.Generator:
        worker = _worker_seed(self.seed)
        owner = (os.getpid(), worker)
        if worker is not None and owner != self._owner:
            self._generator = torch.Generator().manual_seed(worker)
            self._owner = owner
        return self._generator

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "state": self._generator.get_state(), "owner": self._owner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generator = torch.Generator()
        self._generator.set_state(state["state"])
        self._owner = state["owner"]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class CacheDataset(Dataset):
    """Training samples from a feature cache; O(1) reads (one chunk per array).

    Args:
        path: the cache file.
        resolution: training tile side, px (default: the cached tile size). Smaller ones
            take a window on the encoder's crop grid: the latent crop and the rows of the
            crops inside it (row-major), as PixCell trains lower resolutions from
            1024 px features.
        preload: read the selected samples into RAM (checked against
            ``psutil.virtual_memory().available × memory_fraction``).
        indices: the samples to use (e.g. a train / validation split), positions in the file.
        seed: seed of the dataset's own generator (used by ``__getitem__``).

    ``sample(i, generator)`` returns ``{"latents": float32 [C, r/8, r/8] = scaled
    (μ + σ·ε), "rows": float32 [(r/crop)², dim], "mask": uint8 [r, r], "tile_id": str,
    "index": int}``, ``index`` being the sample's position in the file. Draw order on the
    generator: the window (when ``r`` < tile size), then ε. The file is opened lazily in
    each process, so the dataset works in DataLoader workers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resolution: int | None = None,
        preload: bool = False,
        indices: Sequence[int] | None = None,
        memory_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.info = read_cache_info(self.path)
        info = self.info
        self.resolution = check_resolution(resolution, info.tile_size, info.encoder_crop,
                                           info.downsample)
        self.indices = _check_indices(indices, info.count, self.path)
        if not self.indices:
            raise EngineError("the cache holds no complete sample to train on", path=self.path)
        if not 0 < memory_fraction <= 1:
            raise EngineError(f"memory_fraction must be in (0, 1], got {memory_fraction}",
                              item="memory_fraction")
        self.memory_fraction = float(memory_fraction)
        self._own = _OwnGenerator(seed)
        self._handle: h5py.File | None = None
        self._pid = -1
        self._data: dict[str, Any] | None = self._preload() if preload else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, -1  # each process opens its own
        return state

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            self._handle = _h5_read(self.path)
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        """Close this process's handle on the file (reads reopen it)."""
        if self._handle is not None:
            self._handle.close()
        self._handle, self._pid = None, -1

    def sample_bytes(self) -> int:
        """Bytes one sample takes in RAM when preloaded (float16 features, uint8 mask)."""
        shapes = _sample_shapes(self.info)
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values()) + 320

    def _preload(self) -> dict[str, Any]:
        import psutil

        need = self.sample_bytes() * len(self.indices)
        available = psutil.virtual_memory().available
        if need > available * self.memory_fraction:
            raise EngineError(
                f"preloading {len(self.indices)} samples needs {_gib(need)}, more than "
                f"{self.memory_fraction:.0%} of the available memory ({_gib(available)}); "
                "use preload=False (reads from disk) or fewer indices",
                path=self.path,
            )
        handle = self._file()
        data: dict[str, Any] = {}
        for name, (shape, dtype) in _sample_shapes(self.info).items():
            array = np.empty((len(self.indices), *shape), dtype=dtype)
            for k, i in enumerate(self.indices):
                handle[name].read_direct(array, np.s_[i], np.s_[k])
            data[name] = array
        data["tile_id"] = [_text(handle["tile_id"][i]) for i in self.indices]
        return data

    def _read(self, k: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        if self._data is not None:
            d = self._data
            return d["posterior"][k], d["rows"][k], d["mask"][k], d["tile_id"][k]
        handle = self._file()
        return (handle["posterior"][i], handle["rows"][i], handle["mask"][i],
                _text(handle["tile_id"][i]))

    def sample(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Sample ``index`` (a position in this dataset) with noise / window from
        ``generator`` (default: the dataset's own)."""
        if not 0 <= index < len(self.indices):
            raise IndexError(f"index {index} out of range for {len(self.indices)} samples")
        gen = generator if generator is not None else self._own.get()
        info, res = self.info, self.resolution
        top, left = draw_window(info.tile_size, res, info.encoder_crop, gen)
        i = self.indices[index]
        posterior, rows, mask, tile_id = self._read(index, i)
        picked = window_rows(info.tile_size, res, info.encoder_crop, top, left)
        return _sample_dict(
            torch.from_numpy(np.asarray(posterior)),
            torch.from_numpy(np.asarray(rows)[picked]),
            np.asarray(mask),
            tile_id,
            i,
            (top, left, res, info.downsample),
            (info.scaling_factor, info.shift_factor),
            gen,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index)


class OnTheFlyDataset(Dataset):
    """The same samples as :class:`CacheDataset`, encoded at every read (no cache).

    Each read encodes the whole tile with the VAE (``codec.encode_posterior``) and the
    window's pixels with the encoder, then draws the window and ε from the generator in
    the cache's order, so a cached and an on-the-fly sample with one generator state
    agree within float16 rounding. ``images``: uint8 ``(S, S, 3)``; ``masks``: uint8
    ``(S, S)`` 0/255; ``"index"`` is the position in ``images``.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        codec: LatentCodec,
        encoder: GridEncoder,
        resolution: int | None = None,
        tile_ids: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        if len(images) != len(masks) or not len(images):
            raise EngineError(f"expected as many masks as images (at least one), got "
                              f"{len(images)} images and {len(masks)} masks", item="masks")
        self.tile_size = int(np.asarray(images[0]).shape[0])
        ids = [f"{i:06d}" for i in range(len(images))] if tile_ids is None else list(tile_ids)
        if len(ids) != len(images):
            raise EngineError("expected one tile id per image", item="tile_ids")
        tiles = [_checked_tile(CacheTile(t, im, m), self.tile_size)
                 for t, im, m in zip(ids, images, masks, strict=True)]
        self.crop = int(encoder.crop)
        if self.tile_size % self.crop or self.tile_size % codec.downsample:
            raise EngineError(f"tiles of {self.tile_size} px: expected a multiple of the encoder "
                              f"crop ({self.crop} px) and of {codec.downsample}",
                              item="images")
        self.images = [t.image for t in tiles]
        self.masks = [t.mask for t in tiles]
        self.tile_ids = ids
        self.codec, self.encoder = codec, encoder
        self.resolution = check_resolution(resolution, self.tile_size, self.crop,
                                           codec.downsample)
        self._own = _OwnGenerator(seed)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Sample ``index`` encoded now; noise / window from ``generator`` (default: own)."""
        if not 0 <= index < len(self.images):
            raise IndexError(f"index {index} out of range for {len(self.images)} samples")
        gen = generator if generator is not None else self._own.get()
        res, down = self.resolution, self.codec.downsample
        top, left = draw_window(self.tile_size, res, self.crop, gen)
        image = self.images[index]
        mean, std = self.codec.encode_posterior(image[None])
        posterior = torch.cat([mean[0], std[0]]).float().cpu()
        window = np.ascontiguousarray(image[top : top + res, left : left + res])
        rows = self.encoder.encode(window[None])[0].float().cpu()
        return _sample_dict(
            posterior, rows, self.masks[index], self.tile_ids[index], index,
            (top, left, res, down), (self.codec.scaling_factor, self.codec.shift_factor), gen,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index)
