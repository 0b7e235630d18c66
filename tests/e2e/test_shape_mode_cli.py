"""``synthesize --mode shape``: vessels of the shape an annotator draws (``--shapes drawn``)
or of real outlines deformed (``--shapes bank``), on the demo project (its first slide
carries two ``Vessel sketch`` outlines) and on a slide + GeoJSON with bad sketches."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon, box

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import read_index
from histosynth.integration.demo.data import CLASS_SKETCH, build_demo_slide
from histosynth.integration.geojson_write import write_annotations
from histosynth.integration.masks import rasterize
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.slides import open_slide, slide_mpp
from histosynth.synthesis import defaults


def _png(path, flags=cv2.IMREAD_UNCHANGED):
    image = cv2.imread(str(path), flags)
    assert image is not None, path
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("histosynth: error:")]


@pytest.fixture(scope="module")
def sketches(demo_project):
    """The demo project's sketches: {annotation id: (entry's slide, annotation)}."""
    project = QuPathProject(demo_project)
    found = {}
    for entry in project.entries:
        for ann in project.annotations(entry):
            if ann.class_name == CLASS_SKETCH:
                found[ann.id] = (entry, ann)
    assert len(found) >= 2
    return found


@pytest.fixture(scope="module")
def drawn(invoke, demo_project, tmp_path_factory):
    """A drawn-shapes run with the embedded default engine, at its own defaults."""
    run = tmp_path_factory.mktemp("shape") / "run"
    result = invoke(
        "-q", "synthesize", "--project", demo_project, "--class", "Vessel", "--mode", "shape",
        "--shapes", "drawn", "--out", run,
    )
    assert result.exit_code == 0, result.output + result.stderr
    return run, result


def test_drawn_shapes_make_one_tile_per_sketch_whose_mask_is_the_sketch(drawn, sketches):
    run, _ = drawn
    rows = read_index(run)
    assert sorted(r["shape_id"] for r in rows) == sorted(sketches)
    assert {r["synthesis_type"] for r in rows} == {"shape"}
    assert {r["shape_source"] for r in rows} == {"drawn"}
    assert all(r["qc"] == "pass" for r in rows), [r["qc"] for r in rows]
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["mode"] == "shape" and config["shapes"] == "drawn"
    assert config["inside_strength"] == 0.0  # the warped donor kept beyond the seam band
    for row in rows:
        entry, sketch = sketches[row["shape_id"]]
        tile, mpp = int(row["tile_size"]), float(row["mpp"])
        scale = slide_mpp(open_slide(entry.image_path)) / mpp  # tile px per level-0 px
        wanted = rasterize(
            [Polygon(sketch.geometry.exterior)],
            origin=(float(row["tile_x"]), float(row["tile_y"])),
            scale=scale,
            shape=(tile, tile),
        ) > 0
        mask = _png(run / row["mask_path"]) > 0
        near = cv2.dilate(wanted.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        got = mask & near
        assert (got & wanted).sum() / (got | wanted).sum() >= 0.98
        assert np.array_equal(_png(run / "refs" / f"{row['id']}-shape-mask.png") > 0, wanted)
        # beyond the pasted ring and 4σ of its seam, the tile is the real background
        image = _png(run / row["image_path"])
        background = _png(run / "refs" / f"{row['id']}-background.png")
        reach = defaults.SEAM_SIGMA * 6 + 4  # ring (2σ) + 4σ + slack
        disc = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * int(reach) + 1, 2 * int(reach) + 1)
        )
        far = cv2.dilate(wanted.astype(np.uint8), disc) == 0
        assert np.array_equal(image[far], background[far])
        # and inside the outline it is not the background any more
        assert (image[wanted] != background[wanted]).any(axis=-1).mean() > 0.9
        geojson = json.loads((run / row["annotation_path"]).read_text())
        inserted = [
            f for f in geojson["features"]
            if f["properties"].get("metadata", {}).get("shape_id") == row["shape_id"]
        ]
        assert len(inserted) == 1


def test_a_drawn_run_resumes_without_making_a_tile_again(invoke, drawn, demo_project):
    run, _ = drawn
    before = {r["id"]: r["image_sha256"] for r in read_index(run)}
    again = invoke(
        "-q", "synthesize", "--project", demo_project, "--class", "Vessel", "--mode", "shape",
        "--shapes", "drawn", "--out", run, "--resume",
    )
    assert again.exit_code == 0, again.stderr
    assert "0 synthetic tile(s) written, 2 already present" in again.output
    assert {r["id"]: r["image_sha256"] for r in read_index(run)} == before


def test_a_bank_of_20_has_20_distinct_outlines_each_the_rows_mask(invoke, demo_project, tmp_path):
    run = tmp_path / "bank"
    result = invoke(
        "-q", "synthesize", "--project", demo_project, "--class", "Vessel", "--mode", "shape",
        "--shapes", "bank", "--count", 20, "--harmonise", "multiband", "--out", run,
    )
    assert result.exit_code == 0, result.output + result.stderr
    rows = read_index(run)
    assert len(rows) == 20 and {r["shape_source"] for r in rows} == {"bank"}
    assert len({r["shape_id"] for r in rows}) == 20
    outlines = []
    for row in rows:
        shape = _png(run / "refs" / f"{row['id']}-shape-mask.png") > 0
        mask = _png(run / row["mask_path"]) > 0
        assert shape.any() and not (shape & ~mask).any()  # the outline is in the row's mask
        ys, xs = np.nonzero(shape)
        outlines.append(shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    for i in range(20):
        for j in range(i):
            a, b = outlines[i], outlines[j]
            if a.shape == b.shape:
                assert (a & b).sum() / (a | b).sum() < 0.98, (i, j)
    # exported like any synthetic row: a segmentation sample with its mask
    exported = invoke("-q", "export", run, "--out", tmp_path / "export", "--include-pending")
    assert exported.exit_code == 0, exported.stderr
    with open(tmp_path / "export" / "train" / "metadata.csv", encoding="utf-8") as handle:
        meta = list(csv.DictReader(handle))
    assert len(meta) == 20 and {m["synthesis_type"] for m in meta} == {"shape"}
    assert {m["has_mask"] for m in meta} == {"true"}


def test_shape_mode_mistakes_fail_with_one_line_and_write_nothing(invoke, demo_project, tmp_path):
    base = ("synthesize", "--project", demo_project, "--class", "Vessel", "--mode", "shape")
    cases = [
        ((*base, "--count", 2), "--mode shape needs --shapes drawn or bank"),
        ((*base, "--shapes", "bank"), "--count is needed"),
        ((*base, "--shapes", "drawn", "--shape-class", "Nope"),
         "no annotation of class 'Nope'; classes present:"),
        (("synthesize", "--project", demo_project, "--class", "Vessel", "--count", 1,
          "--shapes", "bank"), "--shapes and --inside-strength need --mode shape"),
        ((*base, "--shapes", "bank", "--count", 1, "--background", "synthetic"),
         "not with --background synthetic"),
    ]
    for k, (args, expected) in enumerate(cases):
        out = tmp_path / f"run{k}"
        result = invoke(*args, "--out", out)
        assert result.exit_code == 1, (args, result.output)
        errors = _errors(result)
        assert len(errors) == 1 and expected in errors[0], (expected, result.stderr)
        assert not out.exists()


@pytest.fixture(scope="module")
def sketched_slide(tmp_path_factory):
    """A small demo slide whose GeoJSON adds one good sketch and four bad ones."""
    folder = tmp_path_factory.mktemp("sketched")
    slide = build_demo_slide(folder / "slide.ome.tif", width=2048, height=1536, seed=1)
    real = [a for a in slide.annotations if a.class_name != CLASS_SKETCH]
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    good = Polygon(np.stack([1000 + 150 * np.cos(t), 760 + 80 * np.sin(t)], axis=1))
    bad = {
        "crossing": Polygon([(300, 300), (500, 500), (500, 300), (300, 500)]),
        "edge": box(0, 600, 200, 800),
        "large": box(100, 100, 1900, 1400),
        "tiny": box(1500, 1200, 1503, 1203),
    }
    good_id = "00000000-0000-4000-8000-000000000001"
    sketches = [Annotation(geometry=good, class_name=CLASS_SKETCH, id=good_id)]
    sketches += [
        Annotation(geometry=geometry, class_name=CLASS_SKETCH, name=name)
        for name, geometry in bad.items()
    ]
    geojson = folder / "annotations.geojson"
    write_annotations(geojson, real + sketches)
    return folder / "slide.ome.tif", geojson


def test_bad_sketches_are_skipped_one_line_each_and_the_good_one_made(
    invoke, sketched_slide, tmp_path
):
    slide, geojson = sketched_slide
    run = tmp_path / "run"
    result = invoke(
        "synthesize", "--slide", slide, "--annotations", geojson, "--class", "Vessel",
        "--mode", "shape", "--shapes", "drawn", "--harmonise", "multiband", "--out", run,
    )
    assert result.exit_code == 0, result.output + result.stderr
    rows = read_index(run)
    assert [r["shape_id"] for r in rows] == ["00000000-0000-4000-8000-000000000001"]
    # --harmonise none keeps the warped composite as it is
    plain = invoke(
        "-q", "synthesize", "--slide", slide, "--annotations", geojson, "--class", "Vessel",
        "--mode", "shape", "--shapes", "drawn", "--harmonise", "none", "--out", tmp_path / "none",
    )
    assert plain.exit_code == 0, plain.stderr
    (kept,) = read_index(tmp_path / "none")
    assert np.array_equal(_png(tmp_path / "none" / kept["image_path"]),
                          _png(tmp_path / "none" / "refs" / f"{kept['id']}-composite.png"))
    skipped = json.loads((run / "run.json").read_text())["skipped"]
    reasons = " | ".join(s["reason"] for s in skipped)
    for expected in ("not one closed outline", "touches the edge of the slide",
                     "larger than the", "no area"):
        assert expected in reasons, reasons
    warned = [line for line in result.stderr.splitlines() if "sketch" in line and "skipped" in line]
    assert len(warned) >= 3, result.stderr


def test_an_open_sketch_is_refused_naming_its_file(invoke, sketched_slide, tmp_path):
    slide, geojson = sketched_slide
    data = json.loads(geojson.read_text())
    data["features"].append(
        {
            "type": "Feature",
            "id": "00000000-0000-4000-8000-00000000000f",
            "geometry": {"type": "LineString", "coordinates": [[10, 10], [50, 60], [90, 10]]},
            "properties": {"objectType": "annotation",
                           "classification": {"name": CLASS_SKETCH, "color": [0, 0, 255]}},
        }
    )
    opened = tmp_path / "open.geojson"
    opened.write_text(json.dumps(data))
    result = invoke(
        "synthesize", "--slide", slide, "--annotations", opened, "--class", "Vessel",
        "--mode", "shape", "--shapes", "drawn", "--out", tmp_path / "run",
    )
    assert result.exit_code == 1
    errors = _errors(result)
    assert len(errors) == 1 and "open.geojson" in errors[0] and "LineString" in errors[0]
    assert not (tmp_path / "run").exists()
