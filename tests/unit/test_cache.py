"""The feature cache (``histosynth.synthesis.cache``) with the tiny engine's real VAE and
encoder on real H&E tiles (crops of the image that ships with TIAToolbox).

Every cached sample is checked against a fresh encoding, the datasets against each other
and against the arithmetic they promise, and the file against interruption (a real
``kill -9`` of a building process), truncation and resumption.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.adapters import base_weight_hash
from histosynth.synthesis.cache import (
    CacheDataset,
    CacheTile,
    OnTheFlyDataset,
    build_cache,
    cached_tile_ids,
    check_resolution,
    content_hash,
    draw_window,
    pixel_sha256,
    read_cache_info,
    window_rows,
)
from histosynth.synthesis.cache.build import _Writer
from histosynth.synthesis.engine import tiny_engine
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import TinyEncoder, uni_grid_crops

TILE, MPP, CROP, BATCH, COUNT = 256, 0.5, 64, 4, 12
SOURCE = "tiatoolbox/data/target_image.png"
# float16 storage: ~3 significant digits
F16 = {"rtol": 2e-3, "atol": 2e-3}


def make_tiles(count: int = COUNT, size: int = TILE) -> list[CacheTile]:
    """Real H&E crops (rotated so no two are alike) with a disk-shaped 0/255 mask each."""
    he = he_source_image()
    tiles = []
    yy, xx = np.ogrid[:size, :size]
    for i in range(count):
        y, x = (i * 61) % (he.shape[0] - size), (i * 89) % (he.shape[1] - size)
        image = np.ascontiguousarray(np.rot90(he[y : y + size, x : x + size], i % 4))
        centre, radius = size // 4 + 9 * i, size // 8 + 3 * i
        mask = (((yy - centre) ** 2 + (xx - size // 2) ** 2) < radius**2).astype(np.uint8) * 255
        kind = "background" if i % 4 == 3 else "vessel"
        tiles.append(CacheTile(f"he-{i:02d}", image, mask, source=SOURCE, kind=kind))
    return tiles


@pytest.fixture(scope="module")
def tiles():
    return make_tiles()


def _build(path, tiles, untrained_engine, **kwargs):
    kwargs.setdefault("batch_size", BATCH)
    return build_cache(
        path,
        tiles,
        codec=untrained_engine.codec,
        encoder=untrained_engine.encoder,
        tile_size=kwargs.pop("tile_size", TILE),
        mpp=kwargs.pop("mpp", MPP),
        **kwargs,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, untrained_engine, tiles):
    path = tmp_path_factory.mktemp("cache") / "vessels.h5"
    _build(path, tiles, untrained_engine, model_id=untrained_engine.model_id)
    return path


def _eps(shape, seed: int, resolution: int = TILE) -> torch.Tensor:
    """ε as the datasets draw it: after the window (when there is one)."""
    generator = torch.Generator().manual_seed(seed)
    draw_window(TILE, resolution, CROP, generator)
    return torch.randn(shape, generator=generator)


# --------------------------------------------------------------------------- contents


def test_info_describes_the_models_and_the_tiles(cache, untrained_engine):
    info = read_cache_info(cache)
    assert (info.tile_size, info.mpp, info.count, info.complete) == (TILE, MPP, COUNT, True)
    assert (info.latent_channels, info.downsample) == (16, 8)
    assert (info.encoder_crop, info.rows, info.dim) == (CROP, 16, 32)
    assert info.scaling_factor == untrained_engine.codec.scaling_factor
    assert info.shift_factor == untrained_engine.codec.shift_factor
    assert info.vae_hash == base_weight_hash(untrained_engine.vae)
    assert info.encoder_hash == base_weight_hash(untrained_engine.encoder)
    assert info.encoder_class == "TinyEncoder" and info.model_id == untrained_engine.model_id
    assert len(info.content_hash) == 64 and info.content_hash == content_hash(cache)
    with h5py.File(cache, "r") as handle:
        assert handle.attrs["count"] == COUNT
        assert handle.attrs["content_hash"].decode() == info.content_hash
        assert handle["posterior"].dtype == np.float16 and handle["rows"].dtype == np.float16
        assert handle["posterior"].chunks == (1, 32, TILE // 8, TILE // 8)
        assert handle["mask"].dtype == np.uint8 and handle["posterior"].maxshape[0] is None


def test_every_sample_equals_a_fresh_encoding(cache, untrained_engine, tiles):
    with h5py.File(cache, "r") as handle:
        for i, tile in enumerate(tiles):
            mean, std = untrained_engine.codec.encode_posterior(tile.image)
            rows = untrained_engine.encoder.encode(tile.image)
            stored = torch.from_numpy(handle["posterior"][i]).float()
            torch.testing.assert_close(stored[:16], mean[0], **F16)
            torch.testing.assert_close(stored[16:], std[0], **F16)
            torch.testing.assert_close(torch.from_numpy(handle["rows"][i]).float(), rows[0], **F16)
            np.testing.assert_array_equal(handle["mask"][i], tile.mask)
            assert handle["tile_id"][i].decode() == tile.tile_id
            assert handle["source"][i].decode() == SOURCE
            assert handle["kind"][i].decode() == tile.kind
            assert handle["pixel_sha256"][i].decode() == pixel_sha256(tile.image)


def test_sample_latents_are_scaled_draws_from_the_cached_posterior(cache, untrained_engine):
    data = CacheDataset(cache)
    with h5py.File(cache, "r") as handle:
        posterior = torch.from_numpy(handle["posterior"][3]).float()
    out = data.sample(3, torch.Generator().manual_seed(7))
    eps = _eps((16, TILE // 8, TILE // 8), 7)
    expected = untrained_engine.codec.to_latents(posterior[:16] + posterior[16:] * eps)
    torch.testing.assert_close(out["latents"], expected)
    assert out["latents"].dtype == torch.float32 and out["rows"].shape == (16, 32)
    assert out["mask"].dtype == torch.uint8 and out["mask"].shape == (TILE, TILE)
    assert (out["tile_id"], out["index"]) == ("he-03", 3)
    # and the codec's own draw from a fresh encoding agrees within float16 rounding
    mean, std = untrained_engine.codec.encode_posterior(make_tiles(4)[3].image)
    fresh = untrained_engine.codec.latents_from_posterior(
        mean, std, torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(out["latents"], fresh[0], rtol=1e-2, atol=1e-2)


def test_a_low_resolution_sample_is_a_window_on_the_crop_grid(cache, untrained_engine, tiles):
    data = CacheDataset(cache, resolution=128)
    assert data.resolution == 128
    with h5py.File(cache, "r") as handle:
        posterior = torch.from_numpy(handle["posterior"][5]).float()
    windows = set()
    for seed in range(12):
        out = data.sample(5, torch.Generator().manual_seed(seed))
        top, left = draw_window(TILE, 128, CROP, torch.Generator().manual_seed(seed))
        assert top % CROP == 0 and left % CROP == 0
        windows.add((top, left))
        pixels = np.ascontiguousarray(tiles[5].image[top : top + 128, left : left + 128])
        # the rows of the sub-grid are the rows of the window's own crops
        torch.testing.assert_close(out["rows"], untrained_engine.encoder.encode(pixels)[0], **F16)
        assert out["rows"].shape == (4, 32)
        lt, ll = top // 8, left // 8
        window = posterior[:, lt : lt + 16, ll : ll + 16]
        eps = _eps((16, 16, 16), seed, resolution=128)
        expected = untrained_engine.codec.to_latents(window[:16] + window[16:] * eps)
        torch.testing.assert_close(out["latents"], expected)
        np.testing.assert_array_equal(
            out["mask"].numpy(), tiles[5].mask[top : top + 128, left : left + 128]
        )
    assert len(windows) > 3  # the window moves with the generator


def test_cache_and_on_the_fly_samples_agree_for_one_generator(cache, untrained_engine, tiles):
    cached = CacheDataset(cache, resolution=128)
    fly = OnTheFlyDataset(
        [t.image for t in tiles],
        [t.mask for t in tiles],
        codec=untrained_engine.codec,
        encoder=untrained_engine.encoder,
        resolution=128,
        tile_ids=[t.tile_id for t in tiles],
    )
    assert len(fly) == len(cached) == COUNT
    for index, seed in ((0, 1), (4, 2), (11, 3)):
        a = cached.sample(index, torch.Generator().manual_seed(seed))
        b = fly.sample(index, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(a["latents"], b["latents"], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(a["rows"], b["rows"], **F16)
        assert torch.equal(a["mask"], b["mask"])
        assert (a["tile_id"], a["index"]) == (b["tile_id"], b["index"])


def test_preload_equals_lazy_reads_of_a_subset(cache):
    subset = [5, 1, 7]
    lazy = CacheDataset(cache, resolution=128, indices=subset)
    loaded = CacheDataset(cache, resolution=128, indices=subset, preload=True)
    assert len(lazy) == len(loaded) == 3
    for k in range(3):
        a = lazy.sample(k, torch.Generator().manual_seed(k))
        b = loaded.sample(k, torch.Generator().manual_seed(k))
        assert a["index"] == b["index"] == subset[k]
        for key in ("latents", "rows", "mask"):
            assert torch.equal(a[key], b[key])
    with pytest.raises(IndexError):
        lazy.sample(3)


def test_preload_refuses_what_does_not_fit_in_memory(cache):
    with pytest.raises(EngineError, match=r"preloading 12 samples needs .* available") as err:
        CacheDataset(cache, preload=True, memory_fraction=1e-12)
    assert str(cache) in str(err.value)
    with pytest.raises(EngineError, match="memory_fraction"):
        CacheDataset(cache, memory_fraction=0)


def test_bad_resolution_and_indices_are_refused(cache):
    for resolution in (96, 512, 0):
        with pytest.raises(EngineError, match="resolution"):
            CacheDataset(cache, resolution=resolution)
    with pytest.raises(EngineError, match="outside the cache's 12 samples"):
        CacheDataset(cache, indices=[0, 12])


def test_the_dataset_works_in_dataloader_workers(cache):
    data = CacheDataset(cache, resolution=128, seed=3)
    data[0]  # opens the file in this process: the handle must not travel to the workers
    pickle.loads(pickle.dumps(data))
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(0)
    )
    batches = list(loader)
    ids = [i for batch in batches for i in batch["tile_id"]]
    assert sorted(ids) == [f"he-{i:02d}" for i in range(COUNT)]
    assert batches[0]["latents"].shape == (4, 16, 16, 16)
    assert batches[0]["rows"].shape == (4, 4, 32)
    # the two workers draw different noise for the same sample position in their batches
    assert not torch.equal(batches[0]["latents"][0], batches[1]["latents"][0])


def test_larger_tiles_keep_the_models_crop(tmp_path, untrained_engine):
    big = make_tiles(3, size=512)
    info = _build(tmp_path / "big.h5", big, untrained_engine, tile_size=512)
    assert (info.rows, info.encoder_crop) == (64, CROP)  # (512 / 64)² rows of the same crops
    out = CacheDataset(tmp_path / "big.h5", resolution=256)[1]
    assert out["latents"].shape == (16, 32, 32) and out["rows"].shape == (16, 32)


# --------------------------------------------------------------------------- building


def test_resume_skips_cached_ids_and_appends_the_rest(tmp_path, untrained_engine, tiles, cache):
    path = tmp_path / "resumed.h5"
    first = _build(path, tiles[:6], untrained_engine)
    assert (first.count, first.complete) == (6, True)
    with pytest.raises(EngineError, match="exists; resume it"):
        _build(path, tiles, untrained_engine)
    info = _build(path, tiles + tiles[:2], untrained_engine, resume=True)  # repeats are skipped
    assert info.count == COUNT and info.complete
    assert cached_tile_ids(path) == {t.tile_id for t in tiles}
    with h5py.File(path, "r") as resumed, h5py.File(cache, "r") as whole:
        assert list(resumed["tile_id"][:]) == list(whole["tile_id"][:])
        np.testing.assert_allclose(
            resumed["posterior"][:].astype(np.float32),
            whole["posterior"][:].astype(np.float32),
            **F16,
        )
    again = _build(path, tiles, untrained_engine, resume=True)  # nothing new
    assert again.content_hash == info.content_hash


def test_a_cached_id_with_other_pixels_is_refused(tmp_path, untrained_engine, tiles):
    path = tmp_path / "changed.h5"
    _build(path, tiles[:2], untrained_engine)
    changed = CacheTile(tiles[0].tile_id, tiles[5].image, tiles[0].mask)
    with pytest.raises(EngineError, match="he-00: is already cached with other pixels"):
        _build(path, [changed], untrained_engine, resume=True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mpp": 0.25}, "mpp"),
        ({"encoder": TinyEncoder(dim=32, seed=1, crop=CROP)}, "encoder_hash"),
        ({"codec": tiny_engine(seed=1, device="cpu").codec}, "vae_hash"),
    ],
)
def test_resume_refuses_a_cache_of_other_models_or_settings(
    cache, untrained_engine, tiles, change, field
):
    before = cache.read_bytes()
    kwargs = {
        "codec": untrained_engine.codec,
        "encoder": untrained_engine.encoder,
        "mpp": MPP,
        **change,
    }
    with pytest.raises(EngineError, match=f"cannot resume: the cache was built with {field}"):
        build_cache(cache, tiles, tile_size=TILE, resume=True, **kwargs)
    assert cache.read_bytes() == before


def test_bad_tiles_and_tile_sizes_are_refused_before_a_file_exists(
    tmp_path, untrained_engine, tiles
):
    path = tmp_path / "bad.h5"
    with pytest.raises(EngineError, match="multiple of the encoder crop"):
        _build(path, tiles, untrained_engine, tile_size=200)
    with pytest.raises(EngineError, match="no tiles to cache"):
        _build(path, [], untrained_engine)
    small = CacheTile("small", tiles[0].image[:128, :128], tiles[0].mask[:128, :128])
    with pytest.raises(EngineError, match="tile small: expected a uint8 RGB image of 256"):
        _build(path, [small], untrained_engine)
    grey = CacheTile("grey", tiles[0].image, (tiles[0].mask // 2))
    with pytest.raises(EngineError, match="tile grey: expected mask values 0 and 255"):
        _build(path, [grey], untrained_engine)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_truncated_or_foreign_files_are_one_clear_error(tmp_path, cache, untrained_engine, tiles):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = np.zeros(3)
    for path, reason in (
        (truncated, "truncated / corrupt"),
        (text, "not an HDF5 file"),
        (foreign, "not a histosynth feature cache"),
    ):
        for attempt in (
            lambda p=path: read_cache_info(p),
            lambda p=path: CacheDataset(p),
            lambda p=path: _build(p, tiles, untrained_engine, resume=True),
        ):
            with pytest.raises(EngineError) as err:
                attempt()
            message = str(err.value)
            assert message.startswith(str(path)) and reason in message and "\n" not in message


# what a building process holds: a POSIX write lock on the cache file
_HOLDER = """
import fcntl, os, sys
fcntl.lockf(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX)
print("writing", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_writer_is_refused(tmp_path, untrained_engine, tiles):
    path = tmp_path / "busy.h5"
    _build(path, tiles[:2], untrained_engine)
    writer = _Writer(path)
    try:
        with pytest.raises(EngineError, match="this process is already writing this cache"):
            _build(path, tiles, untrained_engine, resume=True)
    finally:
        writer.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "writing"
        assert read_cache_info(path).count == 2  # readers are welcome meanwhile
        with pytest.raises(EngineError, match="another process is writing this cache"):
            _build(path, tiles, untrained_engine, resume=True)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    assert _build(path, tiles[:3], untrained_engine, resume=True).count == 3


_BUILDER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_cache import make_tiles
from histosynth.synthesis.engine import load_engine
from histosynth.synthesis.cache import build_cache

untrained_engine = load_engine("tiny", device="cpu")

def slowly():
    for tile in make_tiles({count}):
        time.sleep(0.05)  # a slow slide reader: the kill lands mid-build
        yield tile

build_cache(sys.argv[1], slowly(), codec=untrained_engine.codec, encoder=untrained_engine.encoder,
            tile_size={tile}, mpp={mpp}, batch_size={batch})
"""


def test_kill_9_mid_build_leaves_a_readable_cache_that_resumes_to_the_same_content(
    tmp_path, untrained_engine
):
    count, batch = 16, 2
    reference = _build(
        tmp_path / "reference.h5", make_tiles(count), untrained_engine, batch_size=batch
    )
    script = tmp_path / "builder.py"
    script.write_text(
        _BUILDER.format(
            tests=str(Path(__file__).parent), count=count, tile=TILE, mpp=MPP, batch=batch
        )
    )
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and read_cache_info(path).count >= 2 * batch:
                break  # read while it is being written (SWMR)
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    interrupted = read_cache_info(path)
    assert 2 * batch <= interrupted.count < count and interrupted.count % batch == 0
    assert not interrupted.complete
    data = CacheDataset(path)
    assert len(data) == interrupted.count
    assert data[interrupted.count - 1]["tile_id"] == f"he-{interrupted.count - 1:02d}"
    data.close()  # HDF5 lets no writer in while this process holds the file open
    resumed = _build(path, make_tiles(count), untrained_engine, batch_size=batch, resume=True)
    assert resumed.count == count and resumed.complete
    assert resumed.content_hash == reference.content_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builder.py", "killed.h5", "reference.h5"]


# --------------------------------------------------------------------------- window arithmetic


@settings(max_examples=200, deadline=None)
@given(
    cells=st.integers(1, 12),
    data=st.data(),
    crop=st.sampled_from([8, 16, 64, 256]),
)
def test_window_rows_are_the_crops_inside_the_window_in_row_major_order(cells, data, crop):
    k = data.draw(st.integers(1, cells))
    r0, c0 = data.draw(st.integers(0, cells - k)), data.draw(st.integers(0, cells - k))
    tile, res = cells * crop, k * crop
    top, left = r0 * crop, c0 * crop
    picked = window_rows(tile, res, crop, top, left)
    inside = [
        i
        for i in range(cells * cells)
        if top <= (i // cells) * crop < top + res and left <= (i % cells) * crop < left + res
    ]
    assert picked == inside  # row-major over the window = ascending over the tile
    assert len(picked) == k * k == (res // crop) ** 2
    assert check_resolution(res, tile, crop) == res
    seed = data.draw(st.integers(0, 2**31))
    t, lft = draw_window(tile, res, crop, torch.Generator().manual_seed(seed))
    assert t % crop == 0 and lft % crop == 0 and 0 <= t <= tile - res and 0 <= lft <= tile - res
    if k == cells:
        assert (t, lft) == (0, 0)


@settings(max_examples=40, deadline=None)
@given(cells=st.integers(1, 5), data=st.data())
def test_window_rows_match_the_encoders_grid_crops(cells, data):
    crop = 8
    k = data.draw(st.integers(1, cells))
    r0, c0 = data.draw(st.integers(0, cells - k)), data.draw(st.integers(0, cells - k))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    image = rng.integers(0, 256, (cells * crop, cells * crop, 3), dtype=np.uint8)
    top, left, res = r0 * crop, c0 * crop, k * crop
    full = uni_grid_crops(image, crop, crop, normalize=False)[0]
    window = uni_grid_crops(
        np.ascontiguousarray(image[top : top + res, left : left + res]), crop, crop, normalize=False
    )[0]
    assert torch.equal(full[window_rows(cells * crop, res, crop, top, left)], window)


def test_off_grid_windows_are_refused():
    with pytest.raises(EngineError, match="not on the 64 px grid"):
        window_rows(256, 128, 64, 32, 0)
    with pytest.raises(EngineError, match="not on the 64 px grid"):
        window_rows(256, 128, 64, 192, 0)


# --------------------------------------------------------------------------- hostile files


def _copy_with(cache: Path, target: Path, change) -> Path:
    import shutil

    shutil.copyfile(cache, target)
    with h5py.File(target, "r+") as handle:
        change(handle, target)
    return target


@pytest.mark.parametrize("kind", ["external link", "soft link loop", "external storage"])
def test_a_cache_whose_data_lies_elsewhere_is_refused(kind, cache, tmp_path):
    """HDF5 external links, links and external storage would let a crafted cache read any
    file (a FIFO would hang training): refused with one line naming the object."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 4096)

    def change(handle, target):
        if kind == "external link":
            with h5py.File(tmp_path / "other.h5", "w") as other:
                other["secret"] = np.arange(4)
            handle["stolen"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/secret")
        elif kind == "soft link loop":
            group = handle.create_group("loop")
            group["self"] = h5py.SoftLink("/loop/self")
        else:
            handle.create_dataset("raw", shape=(16,), dtype="u1", external=[(str(outside), 0, 16)])

    crafted = _copy_with(cache, tmp_path / "crafted.h5", change)
    with pytest.raises(EngineError, match=r"a cache holds its own data only|outside the file"):
        read_cache_info(crafted)
    with pytest.raises(EngineError) as err:
        CacheDataset(crafted)
    assert str(crafted) in str(err.value)
