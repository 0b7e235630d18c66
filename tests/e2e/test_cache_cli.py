"""End to end: ``histosynth cache build`` on a real demo project, slide and dataset.

A QuPath project around one real pyramidal demo slide (TIAToolbox's H&E, painted and
annotated vessels), the tiny engine's real VAE and encoder (UNTRAINED weights), and the
cache read back with ``CacheDataset``; every bad input is one line on stderr, exit 1 and
no partial file.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from shapely.geometry import box

from histosynth.integration.dataset import read_index, update_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.integration.masks import tissue_mask
from histosynth.integration.slides import open_slide, read_tile
from histosynth.synthesis.cache import CacheDataset, read_cache_info
from histosynth.synthesis.engine import tiny_engine

TILE, MPP = 256, 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    slide = build_demo_slide(root / "slides" / "slide.ome.tif", width=2048, height=1536, seed=1)
    project = build_demo_project(root / "project", slide=slide)
    return {"root": root, "slide": slide, "project": project}


@pytest.fixture(scope="module")
def project_cache(invoke, demo):
    out = demo["root"] / "caches" / "project.h5"
    result = invoke("cache", "build", "--project", demo["project"], "--class", "Vessel",
                    "--model", "tiny", "--out", out, "--background-tiles", 2)
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


@pytest.fixture(scope="module")
def extracted(invoke, demo):
    out = demo["root"] / "extracted"
    result = invoke("--quiet", "extract", "--project", demo["project"], "--class", "Vessel",
                    "--out", out, "--tile-size", TILE, "--mpp", MPP)
    assert result.exit_code == 0, result.output + result.stderr
    return out


def _kinds(path):
    data = CacheDataset(path)
    samples = [data[i] for i in range(len(data))]
    return data, samples


def test_project_cache_holds_vessel_and_background_tiles(demo, project_cache):
    out, result = project_cache
    assert "UNTRAINED" in result.output and f"cache: {out}" in result.output
    info = read_cache_info(out)
    assert (info.tile_size, info.mpp, info.rows, info.encoder_crop) == (TILE, MPP, 16, 64)
    assert info.complete and info.model_id.startswith("tiny")
    data, samples = _kinds(out)
    with h5py.File(out, "r") as handle:
        kinds = [k.decode() for k in handle["kind"][:]]
        sources = {s.decode() for s in handle["source"][:]}
    assert kinds.count("background") == 2 and kinds.count("vessel") == len(data) - 2 > 0
    assert sources == {str(demo["slide"].path)}
    reader = open_slide(demo["slide"].path)
    for sample, kind in zip(samples, kinds, strict=True):
        assert sample["latents"].shape == (16, TILE // 8, TILE // 8)
        assert sample["rows"].shape == (16, 32) and sample["mask"].shape == (TILE, TILE)
        if kind == "vessel":
            assert sample["mask"].any()
            continue
        assert not sample["mask"].any()
        x, y = (int(v) for v in sample["tile_id"].rsplit("-", 2)[1:])
        extent = TILE * MPP / demo["slide"].mpp
        region = box(x, y, x + extent, y + extent)
        assert not any(a.geometry.intersects(region) for a in demo["slide"].annotations)
        assert tissue_mask(read_tile(reader, x, y, TILE, MPP)).mean() > 0.6


def test_resume_adds_nothing_and_keeps_the_content_hash(invoke, demo, project_cache):
    out, _ = project_cache
    before = read_cache_info(out)
    result = invoke("cache", "build", "--project", demo["project"], "--class", "Vessel",
                    "--model", "tiny", "--out", out, "--background-tiles", 2, "--resume")
    assert result.exit_code == 0, result.output + result.stderr
    assert "0 tile(s) cached" in result.output
    assert f"{before.count} already present" in result.output
    assert read_cache_info(out).content_hash == before.content_hash


def test_dataset_cache_leaves_out_rejected_tiles_and_matches_the_project_cache(invoke,
    demo, extracted, project_cache
):
    rows = read_index(extracted)
    rejected = rows[0]["id"]
    update_index(extracted, {rejected: {"review_status": "rejected"}})
    out = demo["root"] / "caches" / "dataset.h5"
    result = invoke("--quiet", "cache", "build", "--dataset", extracted, "--model", "tiny",
                    "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    with h5py.File(out, "r") as a, h5py.File(project_cache[0], "r") as b:
        from_dataset = dict(zip(a["tile_id"][:], a["pixel_sha256"][:], strict=True))
        from_project = dict(zip(b["tile_id"][:], b["pixel_sha256"][:], strict=True))
    assert set(from_dataset) == {r["id"].encode() for r in rows} - {rejected.encode()}
    # extract's tiles and the cache's own vessel tiles are the same pixels under the same ids
    assert all(from_project[k] == v for k, v in from_dataset.items())


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny-seed1"
    return tiny_engine(seed=1, device="cpu").save_pretrained(folder)


def _bad_cases(demo, extracted, project_cache, other_model, tmp):
    """name → (model, arguments, what the one line on stderr says)."""
    cache = project_cache[0]
    project = ("--project", demo["project"], "--class", "Vessel")
    empty = tmp / "empty-run"
    empty.mkdir()
    (empty / "index.csv").write_bytes((extracted / "index.csv").read_bytes())
    update_index(empty, {r["id"]: {"review_status": "rejected"} for r in read_index(empty)})
    truncated = tmp / "truncated.h5"
    truncated.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    return {
        "empty dataset": ("tiny", ("--dataset", empty, "--out", tmp / "a.h5"),
                          "no tiles to cache"),
        "no tile fits": ("tiny", (*project, "--mpp", 0.25, "--tile-size", 64,
                                  "--out", tmp / "b.h5"), "no tiles found to cache"),
        "tile size off the crop grid": ("tiny", (*project, "--tile-size", 200,
                                                 "--out", tmp / "c.h5"),
                                        "not a multiple of the encoder crop (64 px"),
        "existing out": ("tiny", (*project, "--out", cache), "exists; pass --resume"),
        "resume, other tile size": ("tiny", (*project, "--tile-size", 128, "--out", cache,
                                             "--resume"),
                                    "--tile-size 128 differs from the cache's (256)"),
        "resume, other mpp": ("tiny", (*project, "--mpp", 0.25, "--out", cache, "--resume"),
                              "--mpp 0.25 differs from the cache's (0.5)"),
        "resume, other model": (other_model, (*project, "--out", cache, "--resume"),
                                "cannot resume: the cache was built with vae_hash"),
        "truncated cache": ("tiny", (*project, "--out", truncated, "--resume"),
                            f"{truncated}: cannot read the cache: not an HDF5 file, or "
                            "truncated"),
    }


def test_bad_inputs_give_one_line_exit_1_and_no_partial_file(invoke,
    demo, extracted, project_cache, other_model, tmp_path
):
    cases = _bad_cases(demo, extracted, project_cache, other_model, tmp_path)
    for name, (model, args, expected) in cases.items():
        out = args[args.index("--out") + 1]
        before = out.read_bytes() if out.exists() else None
        siblings = sorted(p.name for p in out.parent.iterdir())
        result = invoke("cache", "build", "--model", model, *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, (name, result.output, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("histosynth: error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])
        assert (out.read_bytes() if out.exists() else None) == before, name
        assert sorted(p.name for p in out.parent.iterdir()) == siblings, name


def test_usage_errors_exit_2(invoke, demo, tmp_path):
    result = invoke("cache", "build", "--model", "tiny", "--out", tmp_path / "x.h5")
    assert result.exit_code == 2 and "give one of --dataset, --project or --slide" in result.stderr
    result = invoke("cache", "build", "--model", "tiny", "--project", demo["project"],
                    "--out", tmp_path / "x.h5")
    assert result.exit_code == 2 and "--class" in result.stderr
    assert not (tmp_path / "x.h5").exists()


def test_slide_and_annotations_input(invoke, demo, tmp_path):
    from histosynth.integration.geojson import write_annotations

    geojson = tmp_path / "slide.geojson"
    write_annotations(geojson, demo["slide"].annotations)
    out = tmp_path / "slide.h5"
    result = invoke("--quiet", "cache", "build", "--slide", demo["slide"].path, "--annotations",
                    geojson, "--class", "Vessel: Invasive", "--model", "tiny", "--out", out,
                    "--tile-size", 512, "--batch-size", 2)
    assert result.exit_code == 0, result.output + result.stderr
    info = read_cache_info(out)
    invasive = demo["slide"].of_class("Vessel: Invasive")
    assert info.count == len(invasive) and (info.tile_size, info.rows) == (512, 64)
    sample = CacheDataset(out, resolution=256)[0]
    assert sample["rows"].shape == (16, 32) and sample["latents"].shape == (16, 32, 32)
    assert np.asarray(sample["mask"]).shape == (256, 256)
