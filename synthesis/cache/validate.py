"""Checks that a cache file is what its header says and holds sane values.

A cache is a file a user hands over, so nothing in it is trusted. The checks come in
three kinds, chosen to stay cheap for 10⁵ samples:

* **at open** (every reader, through ``info_of_handle``): each attribute's type and
  range (:func:`attribute_value`, :func:`check_attributes`), and each dataset's kind,
  dtype, per-sample shape, chunking and stored bytes against those attributes
  (:func:`check_layout`) — HDF5 metadata only, O(1) in the number of samples; then the
  content hash recomputed from the stored per-sample digests (64 B a sample: 6.4 MB
  read for 10⁵ samples) against the stored ``content_hash``.
* **per sample read** (:func:`verify_sample`, on every read of ``CacheDataset``): the
  values (finite; latent mean and σ within :data:`MEAN_LIMIT` and :data:`STD_LIMIT`;
  masks 0 / 255) and the sample's sha256 recomputed over what training reads, against
  its stored digest — O(sample bytes): one sha256 pass and integer checks of the float16
  bit patterns, about 3 ms on one core for a 1024 px sample (2 MB), small beside a
  training step.
* **once before an adapter is saved** (``CacheDataset.verified_content_hash``): the
  samples not read yet in this process, in one streaming pass (a second full read only
  when training read none of them), so the hash an adapter records was computed.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histosynth.synthesis.errors import EngineError

MAX_TILE = 16384
"""Largest tile side a cache may claim, px."""

MAX_CHANNELS = 1024
"""Most VAE latent channels a cache may claim."""

MAX_DIM = 65536
"""Widest encoder row a cache may claim (features)."""

MAX_SAMPLE_BYTES = 2**30
"""Most bytes one sample (posterior + rows + mask) may take in memory."""

MEAN_LIMIT = 1e3
"""Bound on ``|μ|`` of a stored VAE posterior, in unscaled VAE latent units (before
``(z − shift) · scale``). Real latents stay within about ±50 (SD3 / FLUX VAEs: a few)."""

STD_LIMIT = 1e2
"""Bound on the stored posterior σ, unscaled VAE latent units: ``0 ≤ σ ≤ 100``, i.e. a
log-variance ``2·ln σ ≤ 9.2``. Real VAEs give σ ≪ 1; σ ≫ 1 would drown the latent in
the sampling noise ``σ·ε``."""

_HEX64 = re.compile(rb"[0-9a-f]{64}")

# --------------------------------------------------------------------------- digests


def sample_sha256(tile_id: str, kind: str, pixel_sha: str, *arrays: np.ndarray) -> str:
    """Hex sha256 of one sample: its id, kind and pixel hash, then the stored bytes of
    ``arrays`` (posterior, rows, mask) in order — what the cache's ``sample_sha256``
    holds and training reads."""
    digest = hashlib.sha256(f"{tile_id}\0{kind}\0{pixel_sha}\0".encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the header


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def attribute_value(value: Any, kind: str | None, name: str, path: Path) -> Any:
    """``value`` as the ``kind`` (``"int"``, ``"float"``, else text) attribute ``name``
    must be: an integer scalar, a finite real scalar, or utf-8 text.

    Raises:
        EngineError: naming the file and the attribute.
    """
    where = f"attribute {name!r}"
    if kind in ("int", "float"):
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value[()]
        integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        real = integer or isinstance(value, (float, np.floating))
        if kind == "int" and integer:
            return int(value)
        if kind == "float" and real and math.isfinite(float(value)):
            return float(value)
        what = "an integer" if kind == "int" else "a finite number"
        raise EngineError(f"{where}: expected {what}, found {_shown(value)}", path=path)
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise EngineError(f"{where} is not utf-8 text ({_shown(value)})", path=path) from None
    if isinstance(value, str):
        return value
    raise EngineError(f"{where}: expected text, found {_shown(value)}", path=path)


def check_attributes(values: Mapping[str, Any], path: Path) -> None:
    """The static attributes (typed by :func:`attribute_value`) in range and agreeing with
    each other: ``tile_size`` (px) in [1, :data:`MAX_TILE`] and a multiple of
    ``encoder_crop`` (px) and of ``downsample`` (px per latent cell); ``rows`` =
    (tile_size / encoder_crop)²; 1 ≤ ``latent_channels`` ≤ :data:`MAX_CHANNELS`;
    1 ≤ ``dim`` ≤ :data:`MAX_DIM`; ``mpp`` (µm/px) and ``scaling_factor`` positive; one
    sample at most :data:`MAX_SAMPLE_BYTES`; the weight hashes 64 hex digits.

    Raises:
        EngineError: naming the file and the first attribute out of place.
    """

    def refuse(name: str, expected: str) -> None:
        raise EngineError(
            f"attribute {name!r} is {_shown(values[name])}: expected {expected}", path=path
        )

    tile, crop, down = values["tile_size"], values["encoder_crop"], values["downsample"]
    if not 1 <= tile <= MAX_TILE:
        refuse("tile_size", f"a tile side from 1 to {MAX_TILE} px")
    if not 1 <= crop <= tile or tile % crop:
        refuse("encoder_crop", f"a divisor of the tile size ({tile} px)")
    if not 1 <= down <= tile or tile % down:
        refuse("downsample", f"a divisor of the tile size ({tile} px)")
    if values["rows"] != (tile // crop) ** 2:
        refuse("rows", f"(tile_size / encoder_crop)² = {(tile // crop) ** 2}")
    if not 1 <= values["latent_channels"] <= MAX_CHANNELS:
        refuse("latent_channels", f"1 to {MAX_CHANNELS}")
    if not 1 <= values["dim"] <= MAX_DIM:
        refuse("dim", f"1 to {MAX_DIM}")
    for name in ("mpp", "scaling_factor"):
        if not values[name] > 0:
            refuse(name, "a positive number")
    side = tile // down
    size = 4 * values["latent_channels"] * side * side + 2 * values["rows"] * values["dim"]
    if size + tile * tile > MAX_SAMPLE_BYTES:
        refuse("tile_size", f"samples of at most {MAX_SAMPLE_BYTES >> 20} MiB")
    for name in ("vae_hash", "encoder_hash"):
        if not _HEX64.fullmatch(values[name].encode()):
            refuse(name, "a sha256 (64 hex digits)")


def _filters(dataset: h5py.Dataset) -> int:
    return int(dataset.id.get_create_plist().get_nfilters())


def check_layout(
    handle: h5py.File,
    shapes: Mapping[str, tuple[tuple[int, ...], str]],
    strings: Mapping[str, int],
    path: Path,
) -> None:
    """Each per-sample dataset as the header says: ``shapes`` (name → per-sample shape,
    dtype) with one sample per chunk, posterior and rows stored without filters; the
    ``strings`` (name → length in bytes) as fixed-length utf-8 strings, one per sample.

    Raises:
        EngineError: naming the file and the dataset.
    """
    for name in (*shapes, *strings):
        item = handle.get(name)
        if not isinstance(item, h5py.Dataset):
            found = "missing" if item is None else f"a {type(item).__name__}, not a dataset"
            raise EngineError(f"not a complete cache: dataset {name!r} is {found}", path=path)
        try:
            dtype, shape, chunks = item.dtype, item.shape, item.chunks
            filters = _filters(item)
        except (OSError, TypeError, ValueError) as err:
            raise EngineError(f"dataset {name!r} is unreadable ({err})", path=path) from err
        if name in shapes:
            sample, want = shapes[name]
            expected = f"{np.dtype(want)} samples of shape {sample}"
            ok = (
                dtype == np.dtype(want)
                and len(shape) == 1 + len(sample)
                and tuple(shape[1:]) == sample
                and chunks == (1, *sample)
                and (name == "mask" or filters == 0)
            )
            layout = f"{dtype} {shape}, chunks {chunks}, {filters} filter(s)"
        else:
            expected = f"fixed-length utf-8 strings of {strings[name]} bytes, one per sample"
            ok = (
                dtype.kind == "S"
                and dtype.itemsize == strings[name]
                and len(shape) == 1
                and h5py.check_string_dtype(dtype) is not None
            )
            layout = f"{dtype} {shape}"
        if not ok:
            raise EngineError(
                f"dataset {name!r} is {layout}: expected {expected} (as the header says)",
                path=path,
            )


def check_storage(
    handle: h5py.File, shapes: Mapping[str, tuple[tuple[int, ...], str]], count: int, path: Path
) -> None:
    """The ``count`` samples claimed are in the file: the unfiltered posterior and rows
    datasets store ``count`` samples' bytes (a file that claims 10⁹ samples but stores a
    few is refused here, before anything allocates or reads for them).

    Raises:
        EngineError: naming the file and the dataset.
    """
    for name in ("posterior", "rows"):
        sample, dtype = shapes[name]
        need = count * math.prod(sample) * np.dtype(dtype).itemsize
        stored = int(handle[name].id.get_storage_size())
        if stored < need:
            raise EngineError(
                f"claims {count} samples but dataset {name!r} stores {stored} bytes, "
                f"not the {need} they take",
                path=path,
            )


# --------------------------------------------------------------------------- samples


def _float16_clear(posterior: np.ndarray, rows: np.ndarray) -> bool:
    """Whether float16 arrays are surely within the bounds, read from their bit patterns
    (integer work: about 10× faster than float16 arithmetic in numpy). A ``False`` may
    be a false alarm; :func:`value_problem` then looks at the values themselves."""
    bits = np.ascontiguousarray(posterior).view(np.uint16)
    half = bits.shape[0] // 2
    magnitude = bits & np.uint16(0x7FFF)  # finite float16 order = this integer order
    std = bits[half:]
    return not (
        magnitude[:half].max() > _F16_MEAN
        or magnitude[half:].max() > _F16_STD
        or (std > 0x8000).any()  # negative, −0 aside
        or (np.ascontiguousarray(rows).view(np.uint16) & np.uint16(0x7C00)).max() == 0x7C00
    )


_F16_MEAN = int(np.float16(MEAN_LIMIT).view(np.uint16))
_F16_STD = int(np.float16(STD_LIMIT).view(np.uint16))


def value_problem(posterior: np.ndarray, rows: np.ndarray, mask: np.ndarray | None) -> str:
    """What is wrong with one sample's values (``""`` when nothing): the posterior
    ``[2·C, h, w]`` = cat(μ, σ) finite with ``|μ| ≤`` :data:`MEAN_LIMIT` and
    ``0 ≤ σ ≤`` :data:`STD_LIMIT` (unscaled VAE latent units), the rows finite, the mask
    0 / 255 only. About 1 ms for a 1024 px sample (float16 features)."""
    if mask is not None:
        odd = (mask - np.uint8(1)) < 254 if mask.dtype == np.uint8 else (mask != 0) & (mask != 255)
        if odd.any():  # uint8: 0 and 255 wrap to 255 and 254, the rest stay below 254
            return "its mask holds values other than 0 and 255"
    f16 = posterior.dtype == np.float16 and rows.dtype == np.float16
    if f16 and _float16_clear(posterior, rows):
        return ""
    values = posterior.astype(np.float32)
    half = values.shape[0] // 2
    mean, std = values[:half], values[half:]
    if not np.isfinite(values).all():
        return "its VAE posterior holds non-finite values"
    top = float(np.abs(mean).max())
    if top > MEAN_LIMIT:
        return (
            f"its latent mean reaches |μ| = {top:.3g}, beyond {MEAN_LIMIT:g} "
            "(unscaled VAE latent units)"
        )
    low, high = float(std.min()), float(std.max())
    if low < 0 or high > STD_LIMIT:
        return (
            f"its latent σ spans [{low:.3g}, {high:.3g}], outside [0, {STD_LIMIT:g}] "
            f"(unscaled VAE latent units; log-variance at most {2 * math.log(STD_LIMIT):.1f})"
        )
    if not np.isfinite(rows).all():
        return "its encoder rows hold non-finite values"
    return ""


def _text(raw: Any, name: str, item: str, path: Path) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise EngineError(f"{name} is not utf-8 text ({_shown(raw)})", item=item,
                          path=path) from None


def verify_sample(
    path: Path,
    index: int,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    texts: Mapping[str, Any],
    shapes: Mapping[str, tuple[tuple[int, ...], str]],
) -> tuple[str, str]:
    """Check sample ``index`` as read: ``arrays`` = (posterior, rows, mask) of the header's
    ``shapes``, ``texts`` = its raw ``tile_id``, ``kind``, ``pixel_sha256`` and
    ``sample_sha256``. Returns ``(tile id, sha256 recomputed)``.

    Raises:
        EngineError: naming the file and the sample (position and id), on the first
            problem: unreadable text, shapes, values (:func:`value_problem`), or a digest
            that is not the one recomputed (data changed after the build).
    """
    item = f"sample {index}"
    tile_id = _text(texts["tile_id"], "tile_id", item, path)
    item = f"sample {index} ({tile_id!r})"
    kind = _text(texts["kind"], "kind", item, path)
    pixel_sha = _text(texts["pixel_sha256"], "pixel_sha256", item, path)
    stored = _text(texts["sample_sha256"], "sample_sha256", item, path)
    if not tile_id or not kind:
        raise EngineError("has an empty tile id or kind", item=item, path=path)
    for name, value in (("pixel_sha256", pixel_sha), ("sample_sha256", stored)):
        if not _HEX64.fullmatch(value.encode()):
            raise EngineError(f"{name} {value[:70]!r} is not a sha256 (64 hex digits)",
                              item=item, path=path)
    for array, name in zip(arrays, ("posterior", "rows", "mask"), strict=True):
        sample, dtype = shapes[name]
        if array.shape != sample or array.dtype != np.dtype(dtype):
            raise EngineError(
                f"{name} is {array.dtype} {array.shape}, expected {dtype} {sample}",
                item=item, path=path,
            )
    problem = value_problem(*arrays)
    if problem:
        raise EngineError(problem, item=item, path=path)
    digest = sample_sha256(tile_id, kind, pixel_sha, *arrays)
    if digest != stored:
        raise EngineError(
            "its data do not match its stored sha256 (changed after the build); rebuild "
            "the cache",
            item=item,
            path=path,
        )
    return tile_id, digest
