"""Hostile feature caches (issue 25): a crafted or damaged cache file gives one
``EngineError`` line naming the file and the attribute, dataset or sample at fault —
never a traceback, an allocation of what the header claims, or silent use.

Every hostile file is made here, at test time, from a small real cache (the tiny
engine's VAE and encoder on TIAToolbox's H&E, as in ``test_cache.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from test_cache import _build, make_tiles

from histosynth.cli import main
from histosynth.synthesis.adapters import read_adapter_info
from histosynth.synthesis.cache import CacheDataset, cached_tile_ids, read_cache_info
from histosynth.synthesis.cache.format import content_digest
from histosynth.synthesis.cache.validate import STD_LIMIT, sample_sha256
from histosynth.synthesis.engine import tiny_engine
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.training import TrainConfig, train_lora

COUNT = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory, untrained_engine):
    path = tmp_path_factory.mktemp("hostile") / "vessels.h5"
    _build(path, make_tiles(COUNT), untrained_engine, model_id=untrained_engine.model_id)
    return path


def crafted(cache: Path, target: Path, change) -> Path:
    """A copy of ``cache`` at ``target`` changed by ``change(handle)``."""
    shutil.copyfile(cache, target)
    with h5py.File(target, "r+") as handle:
        change(handle)
    return target


def rehash(handle: h5py.File, index: int) -> None:
    """Store sample ``index``'s digest (and the content hash) for what it holds now: a
    consistent file whose values are wrong, as a broken build would write."""
    text = {n: handle[n][index].decode() for n in ("tile_id", "kind", "pixel_sha256")}
    arrays = [handle[n][index] for n in ("posterior", "rows", "mask")]
    handle["sample_sha256"][index] = sample_sha256(
        text["tile_id"], text["kind"], text["pixel_sha256"], *arrays
    ).encode()
    count = int(handle["committed"][0])
    handle.attrs.modify("content_hash", content_digest(handle, count).encode())


def one_line(err: pytest.ExceptionInfo, path: Path, *fragments: str) -> str:
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def setattr_(name, value):
    def change(handle):
        handle.attrs[name] = value

    return change


def replace(name, data):
    def change(handle):
        del handle[name]
        handle[name] = data

    return change


# --------------------------------------------------------------------------- the header

HEADER_CASES = {
    "downsample 0": (setattr_("downsample", 0), "'downsample' is 0"),
    "encoder_crop 0": (setattr_("encoder_crop", 0), "'encoder_crop' is 0"),
    "tile_size 10⁹": (setattr_("tile_size", 10**9), "'tile_size' is 1000000000"),
    "tile_size negative": (setattr_("tile_size", -256), "'tile_size' is -256"),
    "tile_size off the crop grid": (setattr_("tile_size", 200), "tile size (200 px)"),
    "tile_size a float": (setattr_("tile_size", 256.5), "'tile_size': expected an integer"),
    "tile_size as text": (setattr_("tile_size", "256"), "'tile_size': expected an integer"),
    "tile_size lies": (setattr_("tile_size", 512), "'rows' is 16"),
    "tile_size and rows lie": (
        lambda h: (setattr_("tile_size", 512)(h), setattr_("rows", 64)(h)),
        "dataset 'posterior' is float16 (4, 32, 32, 32)",
    ),
    "latent_channels lies": (setattr_("latent_channels", 4), "dataset 'posterior'"),
    "rows lies": (setattr_("rows", 4), "'rows' is 4"),
    "dim lies": (setattr_("dim", 64), "dataset 'rows'"),
    "mpp nan": (setattr_("mpp", float("nan")), "'mpp': expected a finite number"),
    "format not utf-8": (setattr_("format", np.bytes_(b"\xff\xfe")), "'format' is not utf-8"),
    "format_version text": (setattr_("format_version", "x"), "'format_version'"),
    "count text": (setattr_("count", "abc"), "'count': expected an integer"),
    "vae_hash not a hash": (setattr_("vae_hash", "x"), "'vae_hash'"),
    "content_hash lies": (
        setattr_("content_hash", np.bytes_(b"0" * 64)),
        "stored content hash",
    ),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_a_header_that_lies_or_is_absurd_is_one_line_naming_the_attribute(cache, tmp_path, case):
    change, fragment = HEADER_CASES[case]
    path = crafted(cache, tmp_path / "hostile.h5", change)
    for attempt in (read_cache_info, CacheDataset, cached_tile_ids):
        with pytest.raises(EngineError) as err:
            attempt(path)
        one_line(err, path, fragment)


DATASET_CASES = {
    "posterior as strings": (replace("posterior", np.array([b"x" * 10] * COUNT)), "posterior"),
    "posterior mis-shaped": (
        replace("posterior", np.zeros((COUNT, 32, 16, 16), np.float16)),
        "posterior",
    ),
    "posterior float32": (
        replace("posterior", np.zeros((COUNT, 32, 32, 32), np.float32)),
        "posterior",
    ),
    "posterior a group": (lambda h: (h.__delitem__("posterior"), h.create_group("posterior")),
                          "'posterior' is a Group"),
    "rows as strings": (replace("rows", np.array([b"x" * 10] * COUNT)), "rows"),
    "rows mis-shaped": (replace("rows", np.zeros((COUNT, 8, 32), np.float16)), "rows"),
    "mask float": (replace("mask", np.zeros((COUNT, 256, 256), np.float32)), "mask"),
    "tile_id variable-length": (
        replace("tile_id", np.array([f"he-{i:02d}" for i in range(COUNT)], dtype=object)),
        "tile_id",
    ),
    "posterior a named type": (
        lambda h: (h.__delitem__("posterior"), h.__setitem__("posterior", np.dtype("f2"))),
        "'posterior' is a Datatype",
    ),
    "committed as text": (replace("committed", np.array([b"4"])), "'committed'"),
    "committed missing": (lambda h: h.__delitem__("committed"), "'committed'"),
    "more committed than stored": (lambda h: h["committed"].__setitem__(0, 99), "99 samples"),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_a_dataset_of_the_wrong_type_or_shape_is_one_line_naming_it(cache, tmp_path, case):
    change, fragment = DATASET_CASES[case]
    path = crafted(cache, tmp_path / "hostile.h5", change)
    for attempt in (read_cache_info, CacheDataset):
        with pytest.raises(EngineError) as err:
            attempt(path)
        one_line(err, path, fragment)


def test_a_cache_claiming_a_billion_samples_is_refused_before_allocating(cache, tmp_path):
    def claim(handle):
        for name in ("posterior", "rows", "mask", "tile_id", "source", "kind",
                     "pixel_sha256", "sample_sha256"):
            handle[name].resize(10**9, axis=0)
        handle["committed"][0] = 10**9
        handle.attrs["count"] = 10**9

    path = crafted(cache, tmp_path / "billion.h5", claim)
    assert path.stat().st_size < 10**7  # HDF5 allocates nothing for the claim
    start = time.perf_counter()
    for attempt in (read_cache_info, CacheDataset, cached_tile_ids):
        with pytest.raises(EngineError) as err:
            attempt(path)
        one_line(err, path, "claims 1000000000 samples", "'posterior'")
    assert time.perf_counter() - start < 5


def test_a_digest_changed_without_the_content_hash_is_refused_at_open(cache, tmp_path):
    path = crafted(cache, tmp_path / "digest.h5", lambda h: h["sample_sha256"].__setitem__(
        2, b"a" * 64))
    with pytest.raises(EngineError) as err:
        CacheDataset(path)
    one_line(err, path, "stored content hash", "samples' digests")


def test_a_damaged_object_header_is_one_line(cache, tmp_path):
    path = tmp_path / "damaged.h5"
    shutil.copyfile(cache, path)
    with h5py.File(path, "r") as handle:
        header = h5py.h5o.get_info(handle["rows"].id).addr
    data = bytearray(path.read_bytes())
    data[header + 20] ^= 0xFF  # HDF5 finds its checksum wrong (a KeyError from h5py)
    path.write_bytes(bytes(data))
    for attempt in (read_cache_info, CacheDataset):
        with pytest.raises(EngineError) as err:
            attempt(path)
        one_line(err, path, "truncated / corrupt", "checksum")


def test_objects_a_cache_does_not_use_are_ignored(cache, tmp_path):
    def extra(handle):
        handle["notes"] = np.dtype("f4")  # a named datatype: no dataset, no group
        handle.create_group("more")["x"] = np.arange(3)

    path = crafted(cache, tmp_path / "extra.h5", extra)
    data = CacheDataset(path)
    assert data.verified_content_hash() == read_cache_info(cache).content_hash


def test_a_soft_link_loop_is_refused_by_the_link_check(cache, tmp_path):
    def loop(handle):
        del handle["rows"]
        handle["rows"] = h5py.SoftLink("/rows")

    path = crafted(cache, tmp_path / "loop.h5", loop)
    with pytest.raises(EngineError) as err:
        CacheDataset(path)
    one_line(err, path, "/rows is a link")


# --------------------------------------------------------------------------- the samples


def poke(name, index, where, value, consistent=True):
    """Set ``name[index][where] = value``; with ``consistent`` the digests follow."""

    def change(handle):
        sample = handle[name][index]
        sample[where] = value
        handle[name][index] = sample
        if consistent:
            rehash(handle, index)

    return change


def restamp(digest: bytes):
    """Store ``digest`` as sample 2's, and the content hash that goes with it."""

    def change(handle):
        handle["sample_sha256"][2] = digest
        handle.attrs.modify("content_hash", content_digest(handle, COUNT).encode())

    return change


VALUE_CASES = {
    "σ = 6·10⁴": (poke("posterior", 2, (20, 3, 3), 6e4), "latent σ spans", "6e+04"),
    "σ negative": (poke("posterior", 2, (20, 3, 3), -1.0), "latent σ spans", "-1"),
    "μ = 2·10³": (poke("posterior", 2, (3, 3, 3), 2e3), "latent mean reaches", "2e+03"),
    "μ NaN": (poke("posterior", 2, (3, 3, 3), np.nan), "non-finite", "posterior"),
    "σ inf": (poke("posterior", 2, (20, 3, 3), np.inf), "non-finite", "posterior"),
    "rows inf": (poke("rows", 2, (3, 3), -np.inf), "encoder rows", "non-finite"),
    "mask not 0/255": (poke("mask", 2, (5, 5), 7), "mask", "0 and 255"),
    "data changed after the build": (
        poke("posterior", 2, (3, 3, 3), 1.5, consistent=False), "stored sha256", "changed"
    ),
    "digest changed": (restamp(b"a" * 64), "stored sha256", "rebuild"),
    "digest not hex": (restamp(b"not a digest"), "sample_sha256", "64 hex"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_a_bad_sample_is_refused_when_read_naming_its_id(cache, tmp_path, case):
    change, *fragments = VALUE_CASES[case]
    path = crafted(cache, tmp_path / "hostile.h5", change)
    data = CacheDataset(path)  # the header is fine: values are checked as samples are read
    data.sample(0)
    with pytest.raises(EngineError) as err:
        data.sample(2)
    one_line(err, path, "sample 2 ('he-02')", *fragments)
    fresh = CacheDataset(path)
    fresh.sample(0)  # training read sample 0 only: the pass before saving finds sample 2
    with pytest.raises(EngineError) as err:
        fresh.verified_content_hash()
    one_line(err, path, "sample 2 ('he-02')", *fragments)
    with pytest.raises(EngineError) as err:
        CacheDataset(path, preload=True)
    one_line(err, path, "sample 2 ('he-02')")


def test_the_value_bounds_are_what_the_docstring_says(cache, tmp_path):
    ok = crafted(cache, tmp_path / "edge.h5", poke("posterior", 1, (20, 0, 0), STD_LIMIT))
    CacheDataset(ok).verified_content_hash()  # σ = 100 exactly is allowed
    over = crafted(cache, tmp_path / "over.h5", poke("posterior", 1, (20, 0, 0), 101.0))
    with pytest.raises(EngineError, match="outside"):
        CacheDataset(over).verified_content_hash()


def test_a_tile_id_that_is_not_utf8_is_refused_naming_the_sample(cache, tmp_path):
    def garble(handle):
        handle["tile_id"][1] = b"\xff\xfe-01"

    path = crafted(cache, tmp_path / "garbled.h5", garble)
    with pytest.raises(EngineError) as err:
        CacheDataset(path).sample(1)
    one_line(err, path, "sample 1", "tile_id is not utf-8")
    with pytest.raises(EngineError) as err:
        cached_tile_ids(path)
    one_line(err, path, "sample 1", "tile_id is not utf-8")


# --------------------------------------------------------------------------- the content hash


def test_the_verified_hash_is_computed_from_the_data(cache):
    data = CacheDataset(cache)
    expected = hashlib.sha256(b"histosynth-feature-cache-v1\n")
    with h5py.File(cache, "r") as handle:
        for i in range(COUNT):
            text = [handle[n][i].decode() for n in ("tile_id", "kind", "pixel_sha256")]
            arrays = [handle[n][i] for n in ("posterior", "rows", "mask")]
            expected.update(sample_sha256(*text, *arrays).encode())
    assert data.verified_content_hash() == expected.hexdigest() == data.info.content_hash


def _lora(engine, data, tmp_path, name="h", **kwargs):
    config = TrainConfig(steps=1, batch_size=1, lr=1e-3, checkpoint_every=1, val_fraction=0,
                         sample_every=0)
    return train_lora(
        engine, data, [0], [], name=name, folder=tmp_path / "lib" / name, config=config,
        work_dir=tmp_path / f"work-{name}", **kwargs,
    )


def test_an_adapter_records_the_hash_computed_and_never_one_of_a_changed_cache(cache, tmp_path):
    engine = tiny_engine(256, device="cpu")
    data = CacheDataset(cache)
    info, _ = _lora(engine, data, tmp_path, training_data_checksum=data.info.content_hash)
    assert read_adapter_info(tmp_path / "lib" / "h").training_data_checksum == (
        data.verified_content_hash()
    )
    assert info.training_data_checksum == data.info.content_hash
    # a sample training never read (only sample 0 trains) changed after the build
    changed = crafted(cache, tmp_path / "changed.h5", poke("rows", 3, (0, 0), 9.0, False))
    with pytest.raises(EngineError) as err:
        _lora(engine, CacheDataset(changed), tmp_path, name="b")
    one_line(err, changed, "sample 3 ('he-03')", "stored sha256")
    assert not (tmp_path / "lib" / "b").exists()
    with pytest.raises(EngineError, match="not the cache's content hash"):
        _lora(engine, CacheDataset(cache), tmp_path, name="c", training_data_checksum="0" * 64)


def test_a_full_fine_tune_records_the_hash_computed_and_refuses_a_changed_cache(cache, tmp_path):
    from histosynth.synthesis.training import train_full

    engine = tiny_engine(256, device="cpu")
    config = TrainConfig(steps=1, batch_size=1, lr=1e-5, checkpoint_every=1, val_fraction=0,
                         sample_every=0)

    def full(path, name):
        return train_full(engine, CacheDataset(path), [0], [], resolution=256,
                          out=tmp_path / name, config=config, work_dir=tmp_path / f"w-{name}")

    out, _ = full(cache, "good")
    meta = json.loads((out / "histosynth_engine.json").read_text())
    assert meta["training"]["training_data_checksum"] == CacheDataset(cache).verified_content_hash()
    changed = crafted(cache, tmp_path / "changed.h5", poke("rows", 3, (0, 0), 9.0, False))
    with pytest.raises(EngineError) as err:
        full(changed, "bad")
    one_line(err, changed, "sample 3 ('he-03')", "stored sha256")
    assert not (tmp_path / "bad").exists()


def test_a_cache_that_does_not_fit_the_model_is_refused_before_training(cache, tmp_path):
    engine = tiny_engine(256, device="cpu")
    with pytest.raises(EngineError) as err:
        _lora(engine, CacheDataset(cache, resolution=128), tmp_path)
    one_line(err, cache, "condition rows")


# --------------------------------------------------------------------------- the command line


def test_train_lora_on_a_hostile_cache_is_one_line_and_exit_1(cache, tmp_path):
    cases = {
        "downsample": setattr_("downsample", 0),
        "sample 2 ('he-02')": poke("posterior", 2, (20, 3, 3), 6e4),
    }
    for k, (fragment, change) in enumerate(cases.items()):
        path = crafted(cache, tmp_path / f"hostile-{k}.h5", change)
        result = CliRunner().invoke(
            main,
            ["--quiet", "train", "lora", "--cache", str(path), "--base", "tiny", "--name", f"h{k}",
             "--steps", "1", "--batch-size", "1", "--sample-every", "0", "--val-fraction",
             "0", "--library", str(tmp_path / "lib"), "--work-dir", str(tmp_path / f"w{k}")],
            catch_exceptions=False,
        )
        assert result.exit_code == 1, result.output
        lines = [x for x in result.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"histosynth: error: {path}: ") and fragment in lines[0]
        assert not (tmp_path / "lib" / f"h{k}").exists()
