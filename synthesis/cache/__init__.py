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

Readers trust nothing in the file (:mod:`~histosynth.synthesis.cache.validate`): the
header is checked against itself at open, each sample's values and sha256 as it is read,
and the content hash an adapter records is computed from the data.

Example:
    >>> engine = load_engine("tiny")                                  # doctest: +SKIP
    >>> tiles = [CacheTile("t0", image, mask, source="slide.svs")]    # doctest: +SKIP
    >>> info = build_cache("vessels.h5", tiles, codec=engine.codec, encoder=engine.encoder,
    ...                    tile_size=256, mpp=0.5)                    # doctest: +SKIP
    >>> CacheDataset("vessels.h5", resolution=128)[0]["latents"].shape  # doctest: +SKIP
    torch.Size([16, 16, 16])
"""

from histosynth.synthesis.cache.build import build_cache
from histosynth.synthesis.cache.datasets import CacheDataset, OnTheFlyDataset
from histosynth.synthesis.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    CacheInfo,
    CacheTile,
    cached_tile_ids,
    check_resolution,
    content_hash,
    draw_window,
    pixel_sha256,
    read_cache_info,
    window_rows,
)

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
