"""End to end: ``histosynth demo`` and ``histosynth synthesize`` with the tiny engine.

Real pyramidal slides and a QuPath project (built by the demo), the real engine classes
at a tiny size (UNTRAINED weights), and the run folder checked against the contracts.
"""

from __future__ import annotations

import json
import uuid

import cv2
import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import box

from histosynth.integration.annotations import class_matches
from histosynth.integration.dataset import INDEX_COLUMNS, read_index
from histosynth.integration.geojson import read_annotations
from histosynth.integration.masks import rasterize
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.slides import open_slide, slide_mpp

TILE, MPP, SIGMA = 256, 0.5, 15.0


@pytest.fixture(scope="module")
def demo(invoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = invoke(
        "demo", "--out", out, "--count", 3, "--steps", 2, "--model", "tiny", "--tile-size", TILE,
        "--harmonise", "diffusion", "--allow-untrained",
    )
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def _png(path, flags=cv2.IMREAD_COLOR):
    image = cv2.imread(str(path), flags)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image


def test_demo_builds_the_project_and_a_run_and_says_the_engine_is_untrained(demo):
    out, result = demo
    assert (out / "project" / "project.qpproj").is_file()
    assert str(out / "project" / "project.qpproj") in result.output
    assert str(out / "run") in result.output
    assert "UNTRAINED" in result.output
    rows = read_index(out / "run")
    assert len(rows) == 3
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["status"] == "complete" and run["engine_trained"] is False
    assert run["config"]["mode"] == "inpaint"


def test_run_folder_meets_the_contract(demo):
    out, _ = demo
    run = out / "run"
    header = (run / "index.csv").read_text().splitlines()[0].split(",")
    assert header[: len(INDEX_COLUMNS)] == list(INDEX_COLUMNS)
    for row in read_index(run):
        assert row["synthesis_type"] == "inpainting" and row["review_status"] == "pending"
        image = _png(run / row["image_path"])
        mask = _png(run / row["mask_path"], cv2.IMREAD_UNCHANGED)
        assert image.shape == (TILE, TILE, 3) and mask.shape == (TILE, TILE)
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        for ref in ("background", "donor", "donor-mask", "vessel-mask", "composite"):
            assert (run / "refs" / f"{row['id']}-{ref}.png").is_file()
        assert 0 <= float(row["insert_x"]) <= TILE and 0 <= float(row["insert_y"]) <= TILE
        for key in (
            "model",
            "seed",
            "steps",
            "guidance_scale",
            "strength",
            "source_image",
            "source_annotation_id",
            "rotation_deg",
        ):
            assert row[key] != "", key
        # GeoJSON: QuPath's import rules, and the same pixels as the mask
        document = json.loads((run / row["annotation_path"]).read_text())
        assert document["type"] == "FeatureCollection" and document["features"]
        for feature in document["features"]:
            uuid.UUID(feature["id"])
            assert feature["properties"]["objectType"] == "annotation"
            assert len(feature["properties"]["classification"]["color"]) == 3
        annotations = read_annotations(run / row["annotation_path"])
        drawn = rasterize(
            [a.geometry for a in annotations], origin=(0, 0), scale=1.0, shape=mask.shape
        )
        agree = ((drawn > 0) == (mask > 0)).mean()
        assert agree > 0.995


def test_far_from_the_seam_the_result_is_the_composite(demo):
    out, _ = demo
    run = out / "run"
    for row in read_index(run):
        image = _png(run / row["image_path"])
        composite = _png(run / "refs" / f"{row['id']}-composite.png")
        donor_mask = _png(run / "refs" / f"{row['id']}-donor-mask.png", cv2.IMREAD_UNCHANGED)
        # the placed donor: where the composite differs from the background can only be
        # inside it; rebuild it from the background and composite refs
        background = _png(run / "refs" / f"{row['id']}-background.png")
        changed = np.any(composite != background, axis=2)
        placed = ndimage.binary_fill_holes(changed) if changed.any() else changed
        assert placed.sum() <= (donor_mask > 0).sum() * 1.05 + 10
        inside = ndimage.distance_transform_edt(placed)
        outside = ndimage.distance_transform_edt(~placed)
        far = inside + outside > 4 * SIGMA + 2  # one of the two is 0 at every pixel
        assert far.any()
        assert np.array_equal(image[far], composite[far])
        # and near the seam the engine did change something (strength 0.55)
        assert not np.array_equal(image, composite)


def test_annotations_already_in_the_background_are_carried(demo):
    """A synthetic tile must not teach a model that a real vessel is background."""
    out, _ = demo
    project = QuPathProject(out / "project")
    entries = {str(e.entry_id): e for e in project.entries}
    for row in read_index(out / "run"):
        entry = entries[row["source_entry_id"]]
        reader = open_slide(entry.image_path)
        scale = slide_mpp(reader) / MPP
        x, y = int(row["tile_x"]), int(row["tile_y"])
        region = box(x, y, x + TILE / scale, y + TILE / scale)
        vessels = [
            a.geometry
            for a in project.annotations(entry)
            if class_matches(a.class_name, "Vessel") and a.geometry.intersects(region)
        ]
        mask = _png(out / "run" / row["mask_path"], cv2.IMREAD_UNCHANGED)
        expected = rasterize(vessels, origin=(x, y), scale=scale, shape=mask.shape)
        assert not np.any((expected > 0) & (mask == 0)), row["id"]
        features = read_annotations(out / "run" / row["annotation_path"])
        assert len(features) == 1 + len(vessels)


def test_demo_again_resumes_without_duplicates(invoke, demo):
    out, _ = demo
    before = {r["id"]: r["image_sha256"] for r in read_index(out / "run")}
    result = invoke(
        "demo", "--out", out, "--count", 3, "--steps", 2, "--model", "tiny", "--tile-size", TILE,
        "--harmonise", "diffusion", "--allow-untrained",
    )
    assert result.exit_code == 0, result.stderr
    assert "0 synthetic tile(s) written, 3 already present" in result.output
    after = {r["id"]: r["image_sha256"] for r in read_index(out / "run")}
    assert after == before


def test_same_seed_same_tiles_and_variation_mode(invoke, demo, tmp_path):
    out, _ = demo
    project = out / "project"
    common = [
        "synthesize",
        "--project",
        project,
        "--class",
        "Vessel",
        "--count",
        2,
        "--model",
        "tiny",
        "--tile-size",
        TILE,
        "--steps",
        2,
        "--seed",
        5,
    ]
    first = invoke(*common, "--out", tmp_path / "a")
    second = invoke(*common, "--out", tmp_path / "b")
    assert first.exit_code == 0 and second.exit_code == 0, first.stderr + second.stderr
    a = {r["id"]: r["image_sha256"] for r in read_index(tmp_path / "a")}
    assert a == {r["id"]: r["image_sha256"] for r in read_index(tmp_path / "b")}

    variation = invoke(
        "synthesize",
        "--project",
        project,
        "--class",
        "Vessel",
        "--count",
        2,
        "--mode",
        "variation",
        "--model",
        "tiny",
        "--tile-size",
        TILE,
        "--steps",
        2,
        "--allow-untrained",
        "--out",
        tmp_path / "v",
    )
    assert variation.exit_code == 0, variation.stderr
    rows = read_index(tmp_path / "v")
    assert [r["synthesis_type"] for r in rows] == ["variation", "variation"]
    # generated pixels: the class, no mask; the untrained engine's noise fails the check
    assert all(r["mask_source"] == "none" and not r["mask_path"] for r in rows)
    assert all(r["qc"].startswith("fail: ") for r in rows)
    assert all((tmp_path / "v" / "refs" / f"{r['id']}-reference.png").is_file() for r in rows)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--class", " "], "name at least one class"),
        (["--class", "Nerve"], "'Nerve'"),
        (["--tile-size", "128", "--model", "pixcell-256"], "pixcell-256"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_no_run(
    invoke, demo, tmp_path, monkeypatch, args, expected
):
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(tmp_path / "settings.yaml"))
    out, _ = demo
    base = {"--class": "Vessel", "--count": "1", "--model": "tiny", "--tile-size": str(TILE)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [x for pair in base.items() for x in pair]
    result = invoke(
        "synthesize", "--project", out / "project", *flat, "--steps", 1, "--out", tmp_path / "run"
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("histosynth: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "run" / "index.csv").exists()


def test_synthetic_background_mode(invoke, demo, tmp_path):
    out, _ = demo
    result = invoke(
        "synthesize",
        "--project",
        out / "project",
        "--class",
        "Vessel",
        "--count",
        1,
        "--model",
        "tiny",
        "--tile-size",
        TILE,
        "--steps",
        2,
        "--background",
        "synthetic",
        "--allow-untrained",
        "--out",
        tmp_path / "s",
    )
    assert result.exit_code == 0, result.stderr
    (row,) = read_index(tmp_path / "s")
    assert row["background_kind"] == "synthetic"
    # the untrained engine's background is noise: written for inspection, flagged
    assert row["qc"].startswith("fail: ") and "FAILED the content check" in result.stderr
    assert row["tile_x"] == "" and row["tile_y"] == ""
    image = _png(tmp_path / "s" / row["image_path"])
    mask = _png(tmp_path / "s" / row["mask_path"], cv2.IMREAD_UNCHANGED)
    background = _png(tmp_path / "s" / "refs" / f"{row['id']}-background.png")
    assert image.shape == background.shape == (TILE, TILE, 3)
    # the generated background carries no annotation: the mask is the inserted donor alone
    vessel = _png(tmp_path / "s" / "refs" / f"{row['id']}-vessel-mask.png", cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask > 0, vessel > 0)
    # pasted with a ring of its own tissue (2σ): the pasted region holds the vessel
    pasted = _png(tmp_path / "s" / "refs" / f"{row['id']}-donor-mask.png", cv2.IMREAD_UNCHANGED)
    assert (pasted > 0).sum() > (vessel > 0).sum()
    assert len(read_annotations(tmp_path / "s" / row["annotation_path"])) == 1


def test_adapter_from_the_library_changes_the_style_and_is_recorded(
    invoke, demo, tmp_path, monkeypatch
):
    import torch

    from histosynth.synthesis.adapters import create_adapter, save_adapter
    from histosynth.synthesis.engine import load_engine

    engine = load_engine("tiny", device="cpu", tile_size=TILE)
    create_adapter(engine.transformer, "warm-stain", domain="test")
    with torch.no_grad():  # a "trained" adapter: B no longer zero
        for name, param in engine.transformer.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    save_adapter(engine.transformer, "warm-stain", tmp_path / "library" / "warm-stain")
    monkeypatch.setenv("HISTOSYNTH_ADAPTERS", str(tmp_path / "library"))

    out, _ = demo
    common = [
        "synthesize",
        "--project",
        out / "project",
        "--class",
        "Vessel",
        "--count",
        1,
        "--model",
        "tiny",
        "--tile-size",
        TILE,
        "--steps",
        2,
        "--seed",
        3,
        "--harmonise",  # the adapter steers the engine's seams: let the tiny engine paint
        "diffusion",
        "--allow-untrained",
    ]
    plain = invoke(*common, "--out", tmp_path / "plain")
    styled = invoke(*common, "--adapter", "warm-stain", "--out", tmp_path / "styled")
    assert plain.exit_code == 0 and styled.exit_code == 0, plain.stderr + styled.stderr
    (p,) = read_index(tmp_path / "plain")
    (s,) = read_index(tmp_path / "styled")
    assert s["adapter"] == "warm-stain" and p["adapter"] == ""
    assert s["image_sha256"] != p["image_sha256"]

    missing = invoke(*common, "--adapter", "nope", "--out", tmp_path / "x")
    assert missing.exit_code == 1 and "'nope'" in missing.stderr
