"""Writing a cache: batches in SWMR mode, resume, recovery of a killed build."""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterable, Iterator, Sized
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from histosynth.common.files import replace_durably
from histosynth.synthesis.adapters import base_weight_hash, histosynth_version
from histosynth.synthesis.cache.format import (
    ARRAYS,
    FORMAT,
    FORMAT_VERSION,
    LOCK_WAIT,
    STATIC_ATTRS,
    STRING_CHUNK,
    STRINGS,
    CacheInfo,
    CacheTile,
    ProgressFn,
    checked_tile,
    content_digest,
    fixed_strings,
    id_hashes,
    info_of_handle,
    is_writer_flag_error,
    open_read,
    pixel_sha256,
    read_cache_info,
    sample_shapes,
    short_error,
    source_text,
)
from histosynth.synthesis.cache.validate import sample_sha256, value_problem
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import GridEncoder
from histosynth.synthesis.models.vae import LatentCodec

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
    keys = (
        "vae_hash",
        "encoder_hash",
        "tile_size",
        "mpp",
        "latent_channels",
        "encoder_crop",
        "rows",
        "dim",
        "scaling_factor",
        "shift_factor",
    )
    for key in keys:
        old, new = getattr(existing, key), getattr(expected, key)
        same = np.isclose(old, new, rtol=1e-9) if isinstance(old, float) else old == new
        if not same:
            raise EngineError(
                f"cannot resume: the cache was built with {key} {old}, this build has {new}; "
                "build a new cache file",
                path=existing.path,
            )


def _create_file(path: Path, info: CacheInfo) -> None:
    """An empty cache at ``path``, written beside it and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with h5py.File(tmp, "w", libver="latest") as handle:
            for name, (shape, dtype) in sample_shapes(info).items():
                handle.create_dataset(
                    name,
                    shape=(0, *shape),
                    maxshape=(None, *shape),
                    chunks=(1, *shape),
                    dtype=dtype,
                    compression="lzf" if name == "mask" else None,
                )
            for name, size in STRINGS.items():
                handle.create_dataset(
                    name,
                    shape=(0,),
                    maxshape=(None,),
                    chunks=(STRING_CHUNK,),
                    dtype=h5py.string_dtype("utf-8", size),
                )
            handle.create_dataset("committed", data=np.zeros(1, dtype=np.int64))
            handle.attrs["format"] = FORMAT
            handle.attrs["format_version"] = FORMAT_VERSION
            for name in STATIC_ATTRS:
                handle.attrs[name] = getattr(info, name)
            handle.attrs["created"] = info.created or datetime.now(UTC).isoformat(
                timespec="seconds"
            )
            handle.attrs["histosynth_version"] = info.histosynth_version or histosynth_version()
            handle.attrs.create("count", 0, dtype=np.int64)
            handle.attrs.create("content_hash", b"", dtype=h5py.string_dtype("ascii", 64))
        replace_durably(tmp, path)
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
        raise EngineError(
            "another process is writing this cache; wait for it to finish", path=path
        ) from err
    return fd


def _open_swmr_writer(path: Path) -> h5py.File:
    """The file opened straight into SWMR write mode (never a non-SWMR writer's state)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    flags = h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


def _recover(path: Path) -> None:
    """Rewrite an interrupted cache with only its complete samples (copy-on-resume)."""
    with open_read(path) as src:
        info = info_of_handle(src, path)
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
            replace_durably(tmp, path)
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
            handle = self._open_waiting()
        except OSError as err:
            if not is_writer_flag_error(err):
                raise EngineError(
                    f"cannot open the cache for writing ({short_error(err)}); close "
                    "what else holds it open",
                    path=self.path,
                ) from err
            return self._recovered()  # a killed writer's file: keep the complete samples
        committed = int(handle["committed"][0])
        if any(handle[name].shape[0] != committed for name in (*ARRAYS, *STRINGS)):
            handle.close()  # a batch that failed half-way: drop it
            return self._recovered()
        return handle

    def _open_waiting(self) -> h5py.File:
        """:func:`_open_swmr_writer`, retried for up to ``LOCK_WAIT`` s while a reader
        holds HDF5's file lock (a reader's plain open lasts a moment)."""
        import time

        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                return _open_swmr_writer(self.path)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

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
            "tile_id": fixed_strings(batch.tile_ids, STRINGS["tile_id"], "tile id"),
            "source": fixed_strings(batch.sources, STRINGS["source"], "source"),
            "kind": fixed_strings(batch.kinds, STRINGS["kind"], "kind"),
            "pixel_sha256": fixed_strings(batch.pixel_shas, 64, "pixel sha256"),
            "sample_sha256": fixed_strings(batch.sample_shas, 64, "sample sha256"),
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
        self.handle.attrs.modify("content_hash", content_digest(self.handle, self.count).encode())
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
        problem = value_problem(posterior[k], features[k], None)
        if problem:  # what a reader would refuse (non-finite in float16, absurd σ, …)
            raise EngineError(f"the models' features are unusable: {problem}",
                              item=f"tile {tile.tile_id}")
    return _Encoded(
        tile_ids=[t.tile_id for t, _ in batch],
        sources=[source_text(t.source) for t, _ in batch],
        kinds=[t.kind for t, _ in batch],
        pixel_shas=[sha for _, sha in batch],
        sample_shas=[
            sample_sha256(t.tile_id, t.kind, sha, posterior[k], features[k], masks[k])
            for k, (t, sha) in enumerate(batch)
        ],
        posterior=posterior,
        rows=features,
        masks=masks,
    )


def _new_tiles(
    tiles: Iterable[CacheTile], known: dict[str, str], tile_size: int
) -> Iterator[tuple[CacheTile, str]]:
    """Validated tiles not yet cached, with their pixel sha256; a known id must have the
    same pixels as its cached sample (else the source changed under the cache)."""
    for raw in tiles:
        tile = checked_tile(raw, tile_size)
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
        raise EngineError(
            "the cache file exists; resume it (--resume) or choose another file", path=path
        )
    _check_compatible(read_cache_info(path), expected)
    return id_hashes(path)


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
