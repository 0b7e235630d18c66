"""End to end: a COCO dataset as input (``--coco FILE --images DIR``) of ``cache build``,
``synthesize`` and ``benchmark downstream`` (issue 31, item 2).

Real tiles from ``extract`` on a demo project of four real pyramidal slides, turned into
a COCO instance file by pycocotools' own encoder (one RLE annotation per connected
vessel of each mask, the tile's slide as provenance); the tiny engine (UNTRAINED) and a
tiny encoder keep each command to seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from histosynth.integration.coco_read import image_mask, read_coco, read_coco_image
from histosynth.integration.dataset import read_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.integration.splits import slide_stem
from histosynth.synthesis.cache import CacheDataset, read_cache_info

coco_mask = pytest.importorskip("pycocotools.mask")

TILE, MPP = 128, 1.0  # the benchmark's sizes
BIG_TILE, BIG_MPP = 256, 0.5  # synthesize's: a donor fits in half a tile


def _to_coco(dataset: Path, out: Path, mpp: float | None) -> Path:
    """The extract folder ``dataset`` as a COCO file made by pycocotools: each row an
    image (its PNG, in place), each connected vessel of its mask an RLE instance."""
    rows = read_index(dataset)
    names = sorted({r["class_name"] for r in rows})
    document = {"info": {} if mpp is None else {"mpp": mpp}, "images": [], "annotations": [],
                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
    for k, row in enumerate(rows, start=1):
        mask = cv2.imread(str(dataset / row["mask_path"]), cv2.IMREAD_GRAYSCALE)
        document["images"].append({
            "id": k, "file_name": row["image_path"], "width": mask.shape[1],
            "height": mask.shape[0], "attributes": {"source_image": row["source_image"]},
        })
        count, labels = cv2.connectedComponents((mask > 0).astype(np.uint8))
        for component in range(1, count):
            rle = coco_mask.encode(np.asfortranarray((labels == component).astype(np.uint8)))
            document["annotations"].append({
                "id": len(document["annotations"]) + 1, "image_id": k,
                "category_id": names.index(row["class_name"]) + 1,
                "segmentation": {"size": [int(v) for v in rle["size"]],
                                 "counts": rle["counts"].decode("ascii")},
                "area": float(coco_mask.area(rle)), "iscrowd": 0,
                "bbox": [float(v) for v in coco_mask.toBbox(rle)],
            })
    out.write_text(json.dumps(document), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def sets(invoke, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco-input")
    slides = [build_demo_slide(root / "slides" / f"slide-{i}.ome.tif", width=1536, height=1024,
                               seed=i) for i in range(4)]
    project = build_demo_project(root / "project", slide=slides)
    for out, tile, mpp in (("real", TILE, MPP), ("real-big", BIG_TILE, BIG_MPP)):
        result = invoke("-q", "extract", "--project", project, "--class", "Vessel",
                        "--tile-size", tile, "--mpp", mpp, "--out", root / out)
        assert result.exit_code == 0, result.output + result.stderr
    return {
        "root": root, "project": project,
        "coco": _to_coco(root / "real", root / "real.json", MPP),
        "coco-big": _to_coco(root / "real-big", root / "real-big.json", None),
    }


def test_a_pycocotools_coco_file_reads_back_equal_to_the_extracted_masks(sets):
    root = sets["root"]
    data = read_coco(sets["coco"], root / "real")
    rows = {r["image_path"]: r for r in read_index(root / "real")}
    assert len(data.images) == len(rows) > 8 and data.mpp == MPP
    assert sum(len(i.instances) for i in data.images) >= len(rows)
    for image in data.images:
        row = rows[image.file_name]
        original = cv2.imread(str(root / "real" / row["mask_path"]), cv2.IMREAD_GRAYSCALE)
        assert original.any() and (image_mask(image) == original).all()
        assert image.source_image == row["source_image"]
        assert image.class_name == row["class_name"]
    # one tile and its mask side by side, to look at
    image = data.images[0]
    overlay = read_coco_image(image).copy()
    overlay[image_mask(image) > 0] = (0.5 * overlay[image_mask(image) > 0]
                                      + (0, 127, 0)).astype(np.uint8)
    sheet = np.concatenate([read_coco_image(image), overlay,
                            np.repeat(image_mask(image)[..., None], 3, axis=2)], axis=1)
    assert cv2.imwrite(str(root / "coco-tile-and-mask.png"), sheet[..., ::-1])


def test_cache_build_reads_a_coco_dataset(invoke, sets):
    root, out = sets["root"], sets["root"] / "caches" / "coco.h5"
    result = invoke("cache", "build", "--coco", sets["coco"], "--images", root / "real",
                    "--model", "tiny", "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    data = read_coco(sets["coco"], root / "real")
    info = read_cache_info(out)
    assert (info.count, info.tile_size, info.mpp) == (len(data.images), TILE, MPP)
    cached = CacheDataset(out)
    masks = {image.tile_id: image_mask(image) for image in data.images}
    for k in range(len(cached)):
        sample = cached[k]
        assert (np.asarray(sample["mask"]) > 0).tolist() == (masks[sample["tile_id"]] > 0).tolist()
    assert f"{len(data.images)} tile(s) cached ({len(data.images)} vessel" in result.output


def test_synthesize_takes_donors_and_backgrounds_from_coco_images(invoke, sets):
    root, out = sets["root"], sets["root"] / "run-coco"
    images = root / "real-big"
    result = invoke("-q", "synthesize", "--coco", sets["coco-big"], "--images", images,
                    "--slide-mpp", BIG_MPP, "--class", "Vessel", "--count", 2,
                    "--harmonise", "multiband", "--model", "tiny", "--tile-size", BIG_TILE,
                    "--mpp", BIG_MPP, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    rows = read_index(out)
    files = {str(images / i.file_name) for i in read_coco(sets["coco-big"], images).images}
    assert len(rows) == 2
    for row in rows:
        assert row["synthesis_type"] == "inpainting"
        assert row["source_image"] in files and row["donor_image"] in files
        assert row["source_annotation_id"].startswith("coco-")
    config = json.loads((out / "run.json").read_text())["config"]
    assert set(config["sources"]) == files


def test_coco_without_a_resolution_is_one_line_and_writes_nothing(invoke, sets, tmp_path):
    root = sets["root"]
    result = invoke("synthesize", "--coco", sets["coco-big"], "--images", root / "real-big",
                    "--class", "Vessel", "--count", 1, "--model", "tiny",
                    "--out", tmp_path / "run")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output + result.stderr
    assert "real-big.json: info.mpp: the tiles' resolution is unknown" in lines[0]
    assert "--slide-mpp" in lines[0] and not (tmp_path / "run").exists()


def test_hostile_coco_on_the_command_line_is_one_line_and_no_file(invoke, sets, tmp_path):
    root = sets["root"]
    hostile = tmp_path / "hostile.json"
    cases = {
        "missing image": (lambda d: d["images"][1].update(file_name="images/gone.png"),
                          "image 2: image file not found"),
        "unknown category": (lambda d: d["annotations"][0].update(category_id=77),
                             "annotation 1: unknown category id 77"),
        "bad RLE size": (lambda d: d["annotations"][0]["segmentation"].update(size=[1, 2]),
                         "annotation 1: RLE size [1, 2] is not the image's"),
    }
    for name, (change, expected) in cases.items():
        document = json.loads(sets["coco"].read_text())
        change(document)
        hostile.write_text(json.dumps(document))
        for command in (["cache", "build", "--model", "tiny", "--out", tmp_path / "c.h5"],
                        ["synthesize", "--class", "Vessel", "--count", 1, "--model", "tiny",
                         "--out", tmp_path / "run"]):
            result = invoke(*command, "--coco", hostile, "--images", root / "real")
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1, (name, result.stderr)
            assert f"hostile.json: {expected}" in lines[0], (name, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.json"]


def test_coco_options_go_together_and_with_no_other_source(invoke, sets, tmp_path):
    root = sets["root"]
    base = ["cache", "build", "--model", "tiny", "--out", tmp_path / "c.h5"]
    result = invoke(*base, "--coco", sets["coco"])
    assert result.exit_code == 2 and "--coco and --images go together" in result.stderr
    result = invoke(*base, "--coco", sets["coco"], "--images", root / "real",
                    "--project", sets["project"])
    assert result.exit_code == 2 and "or --coco (with --images)" in result.stderr
    result = invoke("benchmark", "downstream", "--synthetic", root, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "--real or --coco" in result.stderr
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "b").exists()


def test_benchmark_downstream_takes_the_real_tiles_from_coco(invoke, sets):
    pytest.importorskip("segmentation_models_pytorch")
    root = sets["root"]
    common = ["--project", sets["project"], "--class", "Vessel", "--tile-size", TILE,
              "--mpp", MPP]
    for args in (
        ["synthesize", *common, "--count", 6, "--model", "tiny", "--harmonise", "multiband",
         "--out", root / "run"],
        ["export", root / "run", "--out", root / "synthetic", "--include-pending"],
    ):
        result = invoke("-q", *args)
        assert result.exit_code == 0, result.output + result.stderr
    out = root / "bench"
    result = invoke("-q", "benchmark", "downstream", "--coco", sets["coco"], "--images",
                    root / "real", "--synthetic", root / "synthetic", "--folds", 2,
                    "--epochs", 1, "--batch-size", 4, "--encoder", "tu-mobilenetv3_small_050",
                    "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "| + Augmentation + Synthetic |" in result.output
    splits = json.loads((out / "splits.json").read_text())
    slides = {slide_stem(r["source_image"]) for r in read_index(root / "real")}
    for fold in splits["folds"]:  # the COCO tiles are split by their provenance's slides
        assert set().union(*fold["slides"].values()) == slides
    config = json.loads((out / "benchmark.json").read_text())["config"]
    assert config["real"] == str(sets["coco"]) and config["real_images"] == str(root / "real")
    assert list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))


def test_histosynth_s_own_coco_export_reads_back_as_its_tiles(invoke, sets):
    """``export --format coco`` of the extract folder, read by ``--coco``: the row ids,
    slides and µm/px come back, and each tile's mask (IoU ≥ 0.98: the export rasterises
    the outlines, a pixel in when its centre is)."""
    root, out = sets["root"], sets["root"] / "exported"
    result = invoke("-q", "export", root / "real", "--format", "coco", "--split", "none",
                    "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    data = read_coco(out / "annotations" / "all.json", out / "images")
    rows = {r["id"]: r for r in read_index(root / "real")}
    assert data.mpp == MPP and sorted(i.tile_id for i in data.images) == sorted(rows)
    for image in data.images:
        row = rows[image.tile_id]
        assert image.source_image == row["source_image"]
        assert image.attributes["slide_group"] == slide_stem(row["source_image"])
        original = cv2.imread(str(root / "real" / row["mask_path"]), cv2.IMREAD_GRAYSCALE) > 0
        mask = image_mask(image) > 0
        assert (mask & original).sum() / (mask | original).sum() >= 0.98
