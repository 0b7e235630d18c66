"""End to end: ``histosynth extract`` on a real pyramidal slide and a QuPath project.

The slide is an OME-TIFF written with tifffile from TIAToolbox's bundled H&E image and
read back through TIAToolbox; the project is a QuPath 0.5 project folder with the
vessels exported as GeoJSON beside it (what the "Export vessels" script writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from shapely import affinity
from shapely.geometry import box
from shapely.ops import unary_union

from histosynth.cli import main
from histosynth.integration.annotations import class_matches
from histosynth.integration.dataset import read_index
from histosynth.integration.demo.data import (
    build_demo_project,
    build_demo_slide,
    write_qupath_geojson_variants,
    write_uncalibrated_tiff,
)
from histosynth.integration.geojson import read_annotations

TILE, MPP = 1024, 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two demo slides and a QuPath project around them."""
    root = tmp_path_factory.mktemp("demo")
    slides = [
        build_demo_slide(root / "slides" / "slide-1.ome.tif", seed=0),
        build_demo_slide(root / "slides" / "slide-2.ome.tif", width=2048, height=1536, seed=1),
    ]
    project = build_demo_project(root / "project", slide=slides)
    return {"root": root, "slides": slides, "project": project}


def run_cli(*args: str):
    return CliRunner().invoke(main, ["--quiet", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def extracted_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dataset"
    result = run_cli("extract", "--project", demo["project"], "--class", "Vessel", "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


@pytest.fixture(scope="module")
def extracted(extracted_run):
    return extracted_run[0]


def test_quiet_silences_progress_and_warnings_not_the_result(extracted_run):
    out, result = extracted_run
    # the demo's border vessel is clipped (a warning) and tqdm would draw on stderr
    assert result.stderr == ""
    assert "tile(s) written" in result.output and f"dataset: {out}" in result.output


def test_into_a_log_the_progress_bar_ends_its_line(demo, tmp_path):
    """Into a pipe (a QuPath script's log, CI) the bar's last state ends with a newline:
    the messages after it start lines of their own (they ran into it: '…tile/s]dataset:')."""
    done = subprocess.run(
        [sys.executable, "-m", "histosynth", "extract", "--project", str(demo["project"]),
         "--class", "Vessel", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout
    bar_lines = [line for line in done.stdout.split("\n") if "tile/s]" in line or "it/s]" in line]
    assert bar_lines, done.stdout  # the bar was drawn
    for line in bar_lines:
        assert line.rstrip().endswith("]"), repr(line)
    assert any(line.startswith("dataset: ") for line in done.stdout.split("\n")), done.stdout


def _vessels(slide):
    return [a for a in slide.annotations if class_matches(a.class_name, "Vessel")]


def test_one_tile_per_vessel_of_the_class_and_its_derived_classes(demo, extracted):
    rows = read_index(extracted)
    expected = {a.id for s in demo["slides"] for a in _vessels(s)}
    assert {r["source_annotation_id"] for r in rows} == expected
    assert len(rows) == len(expected)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["class_name"] for r in rows} == {"Vessel", "Vessel: Invasive"}
    assert all(r["synthesis_type"] == "extracted" and r["review_status"] == "pending" for r in rows)
    run = json.loads((extracted / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["config"]["classes"] == ["Vessel"]


def test_tiles_are_centred_inside_the_slide_and_match_the_slide_pixels(demo, extracted):
    from tiatoolbox.wsicore.wsireader import WSIReader

    slides = {str(s.path): s for s in demo["slides"]}
    annotations = {a.id: a for s in demo["slides"] for a in s.annotations}
    for row in read_index(extracted):
        slide = slides[row["source_image"]]
        x, y = int(row["tile_x"]), int(row["tile_y"])
        extent = TILE * MPP / slide.mpp
        assert int(row["tile_size"]) == TILE and float(row["mpp"]) == MPP
        assert 0 <= x and 0 <= y
        # inside the slide; a slide smaller than the tile starts it at 0 (white beyond)
        assert x + extent <= slide.width + 1 or (x == 0 and slide.width < extent)
        assert y + extent <= slide.height + 1 or (y == 0 and slide.height < extent)
        minx, miny, maxx, maxy = annotations[row["source_annotation_id"]].geometry.bounds
        cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
        # centred, unless the slide border pushed the tile inwards
        if extent / 2 <= cx <= slide.width - extent / 2:
            assert abs(x + extent / 2 - cx) <= 1
        if extent / 2 <= cy <= slide.height - extent / 2:
            assert abs(y + extent / 2 - cy) <= 1

        image = cv2.cvtColor(cv2.imread(str(extracted / row["image_path"])), cv2.COLOR_BGR2RGB)
        assert image.shape == (TILE, TILE, 3)
        digest = hashlib.sha256((extracted / row["image_path"]).read_bytes()).hexdigest()
        assert digest == row["image_sha256"]
        # independent check: level-0 pixels of the same region, downsampled by area
        reader = WSIReader.open(slide.path)
        level0 = reader.read_bounds(
            (x, y, x + int(extent), y + int(extent)),
            resolution=0,
            units="level",
            pad_mode="constant",
            pad_constant_values=255,
        )[..., :3]
        expected = cv2.resize(level0, (TILE, TILE), interpolation=cv2.INTER_AREA)
        assert np.abs(image.astype(int) - expected.astype(int)).mean() < 6


def test_masks_hold_every_vessel_in_the_tile_within_one_percent(demo, extracted):
    slides = {str(s.path): s for s in demo["slides"]}
    saw_two = False
    for row in read_index(extracted):
        slide = slides[row["source_image"]]
        mask = cv2.imread(str(extracted / row["mask_path"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (TILE, TILE) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        x, y = int(row["tile_x"]), int(row["tile_y"])
        scale = slide.mpp / MPP
        region = box(x, y, x + TILE / scale, y + TILE / scale)
        inside = [a.geometry for a in _vessels(slide) if a.geometry.intersects(region)]
        saw_two |= len(inside) >= 2
        expected = affinity.affine_transform(
            unary_union(inside).intersection(region), [scale, 0, 0, scale, -x * scale, -y * scale]
        ).area
        assert expected > 100
        assert abs((mask > 0).sum() - expected) <= 0.01 * expected, row["id"]

        tile_annotations = read_annotations(extracted / row["annotation_path"])
        assert len(tile_annotations) == len(inside)
        for ann in tile_annotations:
            minx, miny, maxx, maxy = ann.geometry.bounds
            assert -0.01 <= minx and -0.01 <= miny and maxx <= TILE + 0.01 and maxy <= TILE + 0.01
            assert class_matches(ann.class_name, "Vessel") and ann.color is not None
        # the GeoJSON and the mask describe the same pixels
        union = unary_union([a.geometry for a in tile_annotations])
        assert abs(union.area - expected) <= 0.002 * expected + 1
    assert saw_two, "the demo's vessel pair should share a tile"


def test_full_class_name_selects_only_the_derived_class(demo, tmp_path):
    out = tmp_path / "invasive"
    result = run_cli(
        "extract", "--project", demo["project"], "--class", "Vessel: Invasive", "--out", out
    )
    assert result.exit_code == 0, result.stderr
    rows = read_index(out)
    invasive = [a for s in demo["slides"] for a in s.of_class("Vessel: Invasive")]
    assert rows and len(rows) == len(invasive)
    assert {r["class_name"] for r in rows} == {"Vessel: Invasive"}


def test_resume_never_duplicates_and_finishes_an_interrupted_run(demo, extracted, tmp_path):
    again = run_cli(
        "extract", "--project", demo["project"], "--class", "Vessel", "--out", extracted
    )
    assert again.exit_code == 1 and "--resume" in again.stderr

    out = tmp_path / "copy"
    result = run_cli("extract", "--project", demo["project"], "--class", "Vessel", "--out", out)
    assert result.exit_code == 0
    full = read_index(out)
    # simulate an interruption after the first rows: keep the header and 3 rows
    index = out / "index.csv"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--project",
            str(demo["project"]),
            "--class",
            "Vessel",
            "--out",
            str(out),
            "--resume",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert f"{len(full) - 3} tile(s) written, 3 already present" in result.output
    rows = read_index(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in full)
    assert {r["id"]: r["image_sha256"] for r in rows} == {r["id"]: r["image_sha256"] for r in full}


def test_vessels_larger_than_the_tile_are_skipped_with_a_reason(demo, tmp_path):
    out = tmp_path / "small"
    result = run_cli(
        "extract",
        "--project",
        demo["project"],
        "--class",
        "Vessel",
        "--out",
        out,
        "--tile-size",
        "256",
    )
    assert result.exit_code == 0, result.stderr
    rows = read_index(out)
    skipped = json.loads((out / "run.json").read_text())["skipped"]
    too_big = [s for s in skipped if "larger than the tile" in s["reason"]]
    assert too_big and rows
    assert len(rows) + len(skipped) == sum(len(_vessels(s)) for s in demo["slides"])
    for row in rows:
        assert cv2.imread(str(out / row["image_path"])).shape == (256, 256, 3)


def test_area_filters_in_square_micrometres(demo, tmp_path):
    areas = sorted(a.geometry.area * s.mpp**2 for s in demo["slides"] for a in _vessels(s))
    low, high = areas[2], areas[-3]
    out = tmp_path / "filtered"
    result = run_cli(
        "extract",
        "--project",
        demo["project"],
        "--class",
        "Vessel",
        "--out",
        out,
        "--min-area",
        low - 1,
        "--max-area",
        high + 1,
    )
    assert result.exit_code == 0, result.stderr
    rows = read_index(out)
    assert len(rows) == sum(low - 1 <= a <= high + 1 for a in areas)
    reasons = json.loads((out / "run.json").read_text())["skipped"]
    assert len(reasons) == len(areas) - len(rows)
    assert all("µm²" in r["reason"] for r in reasons)


def test_slide_with_every_qupath_geojson_flavour(demo, tmp_path):
    slide = demo["slides"][1]
    variants = write_qupath_geojson_variants(slide.annotations, tmp_path / "geojson")
    expected_all = len(_vessels(slide))
    for name, path in variants.items():
        out = tmp_path / f"run-{name}"
        result = run_cli(
            "extract",
            "--slide",
            slide.path,
            "--annotations",
            path,
            "--class",
            "Vessel",
            "--out",
            out,
        )
        assert result.exit_code == 0, f"{name}: {result.stderr}"
        rows = read_index(out)
        if name == "v0.4_single_feature":
            first = slide.annotations[0]
            assert len(rows) == int(class_matches(first.class_name, "Vessel")), name
        else:
            assert len(rows) == expected_all, name
            masks = sorted((out / "masks").iterdir())
            assert all(cv2.imread(str(m), cv2.IMREAD_UNCHANGED).any() for m in masks)


def test_uncalibrated_slide_needs_mpp(demo, tmp_path):
    slide = demo["slides"][1]
    from tiatoolbox.wsicore.wsireader import WSIReader

    pixels = WSIReader.open(slide.path).slide_thumbnail(resolution=0, units="level")[..., :3]
    plain = write_uncalibrated_tiff(tmp_path / "plain.tif", pixels)
    geojson = tmp_path / "a.geojson"
    from histosynth.integration.geojson import write_annotations

    write_annotations(geojson, slide.annotations)
    out = tmp_path / "out"
    result = run_cli(
        "extract", "--slide", plain, "--annotations", geojson, "--class", "Vessel", "--out", out
    )
    assert result.exit_code == 1
    assert "--mpp" in result.stderr and "plain.tif" in result.stderr
    assert not out.exists()
    result = run_cli(
        "extract",
        "--slide",
        plain,
        "--annotations",
        geojson,
        "--class",
        "Vessel",
        "--out",
        out,
        "--slide-mpp",
        slide.mpp,
    )
    assert result.exit_code == 0, result.stderr
    assert len(read_index(out)) == len(_vessels(slide))


def _feature(geometry, class_name="Vessel"):
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": "annotation",
            "classification": {"name": class_name, "color": [200, 0, 0]},
        },
    }


def _square(x, y, size=100):
    return {
        "type": "Polygon",
        "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]],
    }


BAD_INPUTS = {
    "malformed json": ("annotations", "{not json", ["bad.geojson"]),
    "point geometry": (
        "annotations",
        {
            "type": "FeatureCollection",
            "features": [
                _feature(_square(100, 100)),
                _feature({"type": "Point", "coordinates": [5, 5]}),
            ],
        },
        ["bad.geojson", "feature 1", "Point"],
    ),
    "outside the slide": (
        "annotations",
        {"type": "FeatureCollection", "features": [_feature(_square(900_000, 900_000))]},
        ["bad.geojson", "outside the slide"],
    ),
    "unknown class": ("class", "Nerve", ["'Nerve'", "Vessel"]),
    "missing slide": ("slide", "absent.ome.tif", ["absent.ome.tif"]),
    "output is a file": ("out", "file", ["out.txt", "is a file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_exit_1_and_no_output(demo, tmp_path, case):
    what, value, expected = BAD_INPUTS[case]
    slide = demo["slides"][1]
    geojson = tmp_path / "good.geojson"
    from histosynth.integration.geojson import write_annotations

    write_annotations(geojson, slide.annotations)
    args = {
        "slide": str(slide.path),
        "annotations": str(geojson),
        "class": "Vessel",
        "out": str(tmp_path / "out"),
    }
    if what == "annotations":
        bad = tmp_path / "bad.geojson"
        bad.write_text(value if isinstance(value, str) else json.dumps(value))
        args["annotations"] = str(bad)
    elif what == "slide":
        args["slide"] = str(tmp_path / value)
    elif what == "out":
        (tmp_path / "out.txt").write_text("not a folder")
        args["out"] = str(tmp_path / "out.txt")
    else:
        args[what] = value
    result = run_cli(
        "extract",
        "--slide",
        args["slide"],
        "--annotations",
        args["annotations"],
        "--class",
        args["class"],
        "--out",
        args["out"],
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("histosynth: error: "), result.stderr
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    if what != "out":
        assert not (tmp_path / "out").exists()


def test_project_missing_required_keys(demo, tmp_path):
    broken = json.loads(Path(demo["project"]).read_text())
    del broken["images"]
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "project.qpproj").write_text(json.dumps(broken))
    result = run_cli("extract", "--project", folder, "--class", "Vessel", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert "project.qpproj" in result.stderr and "images" in result.stderr
    assert not (tmp_path / "o").exists()


def test_installed_console_script_exit_codes(demo, tmp_path):
    """The real ``histosynth`` executable: 0 on --help, 2 on usage errors, 1 with one line."""
    exe = Path(sys.executable).with_name("histosynth")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([exe, "extract", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--tile-size" in ok.stdout
    usage = subprocess.run(
        [exe, "extract", "--out", tmp_path / "x"], capture_output=True, text=True, env=env
    )
    assert usage.returncode == 2
    bad = tmp_path / "bad.geojson"
    bad.write_text("[1, 2")
    error = subprocess.run(
        [
            exe,
            "extract",
            "--slide",
            demo["slides"][1].path,
            "--annotations",
            bad,
            "--class",
            "Vessel",
            "--out",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert error.returncode == 1
    assert error.stderr.strip().count("\n") == 0 and "bad.geojson" in error.stderr
    assert "Traceback" not in error.stderr


def test_entry_without_annotations_is_skipped_with_a_warning_naming_it(demo, tmp_path):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(Path(demo["project"]).parent, project)
    (project / "annotations" / "2.geojson").unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["extract", "--project", str(project), "--class", "Vessel", "--out", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "histosynth: warning:" in line]
    assert any("2" in line and "slide-2" in line for line in warnings), result.stderr
    rows = read_index(out)
    assert rows and {r["source_entry_id"] for r in rows} == {"1"}


def test_sidecar_of_an_unknown_entry_is_named_in_a_warning(demo, tmp_path):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(Path(demo["project"]).parent, project)
    stray = project / "annotations" / "99.geojson"
    shutil.copy(project / "annotations" / "1.geojson", stray)
    result = CliRunner().invoke(
        main,
        ["extract", "--project", str(project), "--class", "Vessel", "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.stderr
    assert any(
        "99.geojson" in line and "belongs to no entry" in line
        for line in result.stderr.splitlines()
    ), result.stderr
    # its vessels are not extracted
    assert len(read_index(tmp_path / "out")) == sum(len(_vessels(s)) for s in demo["slides"])
