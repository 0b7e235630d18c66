"""Training samples from a cache (:class:`CacheDataset`) or encoded on the fly."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from histosynth.synthesis.cache.format import (
    ARRAYS,
    CacheTile,
    check_resolution,
    checked_tile,
    digest_of_samples,
    draw_window,
    read_cache_info,
    read_handle,
    sample_dict,
    sample_shapes,
    short_error,
    window_rows,
)
from histosynth.synthesis.cache.validate import verify_sample
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import GridEncoder
from histosynth.synthesis.models.vae import LatentCodec

# --------------------------------------------------------------------------- datasets


def _check_indices(indices: Sequence[int] | None, count: int, path: Path) -> list[int]:
    if indices is None:
        return list(range(count))
    chosen = [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise EngineError(
            f"indices {bad[:5]} are outside the cache's {count} samples", path=path, item="indices"
        )
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


_TEXTS = ("tile_id", "kind", "pixel_sha256", "sample_sha256")
"""The string datasets a sample's digest covers (with its arrays)."""


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
        self.resolution = check_resolution(
            resolution, info.tile_size, info.encoder_crop, info.downsample
        )
        self.indices = _check_indices(indices, info.count, self.path)
        if not self.indices:
            raise EngineError("the cache holds no complete sample to train on", path=self.path)
        if not 0 < memory_fraction <= 1:
            raise EngineError(
                f"memory_fraction must be in (0, 1], got {memory_fraction}", item="memory_fraction"
            )
        self.memory_fraction = float(memory_fraction)
        self._own = _OwnGenerator(seed)
        self._handle: h5py.File | None = None
        self._pid = -1
        self._shapes = sample_shapes(info)
        self._digests: dict[int, bytes] = {}  # file position → sha256 recomputed here
        self._data: dict[str, Any] | None = self._preload() if preload else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, -1  # each process opens its own
        return state

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            self._handle = read_handle(self.path)
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        """Close this process's handle on the file (reads reopen it)."""
        if self._handle is not None:
            self._handle.close()
        self._handle, self._pid = None, -1

    def sample_bytes(self) -> int:
        """Bytes one sample takes in RAM when preloaded (float16 features, uint8 mask)."""
        shapes = sample_shapes(self.info)
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
        data: dict[str, Any] = {
            name: np.empty((len(self.indices), *shape), dtype=dtype)
            for name, (shape, dtype) in self._shapes.items()
        }
        data["tile_id"] = []
        for k, i in enumerate(self.indices):
            *arrays, tile_id = self._read_file(i)
            for name, array in zip(ARRAYS, arrays, strict=True):
                data[name][k] = array
            data["tile_id"].append(tile_id)
        return data

    def _read_file(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """Sample ``i`` of the file, its values and digest verified (see the class)."""
        handle = self._file()
        try:
            arrays = tuple(handle[name][i] for name in ARRAYS)
            texts = {name: handle[name][i] for name in _TEXTS}
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, IndexError) as err:
            raise EngineError(
                f"sample {i} is unreadable, truncated / corrupt ({short_error(err)})",
                path=self.path,
            ) from err
        tile_id, digest = verify_sample(self.path, i, arrays, texts, self._shapes)
        self._digests[i] = digest.encode()
        return (*arrays, tile_id)

    def _read(self, k: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        if self._data is not None:
            d = self._data
            return d["posterior"][k], d["rows"][k], d["mask"][k], d["tile_id"][k]
        return self._read_file(i)

    def verified_content_hash(self) -> str:
        """The cache's content hash computed from its data: every sample not yet read in
        this process is read and verified (one streaming pass over the rest), then the
        hash is taken over the recomputed per-sample digests. This is the hash an
        adapter records; it equals ``self.info.content_hash`` for an intact file.

        Raises:
            EngineError: naming the file and the first sample that fails its checks, or
                the file changed since it was opened.
        """
        for i in range(self.info.count):
            if i not in self._digests:
                self._read_file(i)
        computed = digest_of_samples(self._digests[i] for i in range(self.info.count))
        if computed != self.info.content_hash:
            raise EngineError(
                "the cache changed while it was read (its content hash was "
                f"{self.info.content_hash[:16]}…, its samples now give {computed[:16]}…)",
                path=self.path,
            )
        return computed

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
        return sample_dict(
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
            raise EngineError(
                f"expected as many masks as images (at least one), got "
                f"{len(images)} images and {len(masks)} masks",
                item="masks",
            )
        self.tile_size = int(np.asarray(images[0]).shape[0])
        ids = [f"{i:06d}" for i in range(len(images))] if tile_ids is None else list(tile_ids)
        if len(ids) != len(images):
            raise EngineError("expected one tile id per image", item="tile_ids")
        tiles = [
            checked_tile(CacheTile(t, im, m), self.tile_size)
            for t, im, m in zip(ids, images, masks, strict=True)
        ]
        self.crop = int(encoder.crop)
        if self.tile_size % self.crop or self.tile_size % codec.downsample:
            raise EngineError(
                f"tiles of {self.tile_size} px: expected a multiple of the encoder "
                f"crop ({self.crop} px) and of {codec.downsample}",
                item="images",
            )
        self.images = [t.image for t in tiles]
        self.masks = [t.mask for t in tiles]
        self.tile_ids = ids
        self.codec, self.encoder = codec, encoder
        self.resolution = check_resolution(resolution, self.tile_size, self.crop, codec.downsample)
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
        return sample_dict(
            posterior,
            rows,
            self.masks[index],
            self.tile_ids[index],
            index,
            (top, left, res, down),
            (self.codec.scaling_factor, self.codec.shift_factor),
            gen,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index)
