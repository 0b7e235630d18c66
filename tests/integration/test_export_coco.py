"""``histosynth export --format coco``: every exported file read back by the reference library
(pycocotools), each tile's instances equal to histosynth's own mask; the RLE helpers agree
with pycocotools' encoder; touching vessels stay two instances, a vessel with a hole is RLE;
variations are image-level labels; slide splits never share a slide; bad input is one line
and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from shapely.geometry import Point, Polygon

from histosynth.integration.annotations import Annotation
from histosynth.integration.coco import (
    category_ids,
    decode_rle,
    encode_rle,
    mask_from_polygons,
)
from histosynth.integration.dataset import RunWriter, TileRecord, read_index, update_index
from histosynth.integration.demo.data import he_source_image
from histosynth.integration.errors import InputError
from histosynth.integration.masks import rasterize
from histosynth.workflows.export_coco import export_coco

TILE = 64
#: pycocotools' decode passes numpy 2 a keyword it does not take (its own warning)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
EXTRA = ("donor_image", "donor_entry_id", "mask_source", "qc")


def circle(x: float, y: float, r: float) -> Polygon:
    return Point(x, y).buffer(r, quad_segs=16)


def vessel(geometry, class_name: str = "Vessel", **props: str) -> Annotation:
    return Annotation(geometry=geometry, class_name=class_name, properties=dict(props))


#: id -> what the tile holds; ``slides``: (vessel's slide, background's slide)
TILES: dict[str, dict] = {
    "touch": {"kind": "inpainting", "slides": ("A", "B"), "anns": [
        vessel(circle(20, 32, 10), histosynth_inserted="true", source_annotation_id="d-1"),
        vessel(circle(40, 32, 10), "Vessel: Invasive"),  # touches the first at (30, 32)
        vessel(circle(55, 8, 5), "Tumor"),  # not a vessel class of the run
    ]},
    "hole": {"kind": "inpainting", "slides": ("A", "C"), "anns": [
        vessel(circle(32, 32, 20).difference(circle(32, 32, 8)), histosynth_inserted="true"),
        vessel(circle(60, 40, 9)),  # reaches past the tile's right edge
    ]},
    "shape": {"kind": "shape", "slides": ("B", "B"), "anns": [
        vessel(Polygon([(8, 8), (50, 12), (40, 52), (12, 40)]), histosynth_inserted="true",
               shape_id="sketch-7"),
    ]},
    "var": {"kind": "variation", "slides": ("A", "A"), "anns": []},
    "qcfail": {"kind": "inpainting", "slides": ("C", "C"), "qc": "fail: colour",
               "anns": [vessel(circle(30, 30, 12))]},
    "rejected": {"kind": "inpainting", "slides": ("A", "A"), "status": "rejected",
                 "anns": [vessel(circle(30, 30, 12))]},
}


def write_run(run: Path, tiles: dict[str, dict], classes=("Vessel",)) -> None:
    """A run folder as ``synthesize`` / ``extract`` write it: each tile's mask is its
    vessel-class features rasterised, its GeoJSON every feature."""
    he = he_source_image()
    with RunWriter(run, config={"mode": "test", "classes": list(classes)},
                   extra_columns=EXTRA) as writer:
        for k, (tile_id, tile) in enumerate(tiles.items()):
            kind, (donor, background) = tile["kind"], tile["slides"]
            anns = tile["anns"]
            vessels = [a.geometry for a in anns if a.class_name.startswith("Vessel")]
            masked = kind != "variation"
            mask = (rasterize(vessels, origin=(0, 0), scale=1, shape=(TILE, TILE))
                    if masked else None)
            writer.add_tile(
                TileRecord(
                    id=tile_id, synthesis_type=kind, class_name="Vessel",
                    source_image=f"/slides/{background}.svs", source_entry_id=str(k),
                    source_annotation_id=f"src-{k}", tile_x=10 * k, tile_y=0, tile_size=TILE,
                    mpp=0.5, model="" if kind == "extracted" else "tiny",
                    extra={
                        "donor_image": "" if kind == "extracted" else f"/slides/{donor}.svs",
                        "donor_entry_id": "",
                        "mask_source": "placed donor" if masked else "none",
                        "qc": tile.get("qc", "" if kind == "extracted" else "pass"),
                    },
                ),
                np.ascontiguousarray(he[40 * k: 40 * k + TILE, 30 * k: 30 * k + TILE]),
                mask,
                anns,
                refs={"reference": he[:TILE, :TILE].copy()} if kind == "variation" else None,
            )
    update_index(run, {tid: {"review_status": t.get("status", "accepted")}
                       for tid, t in tiles.items()})


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    write_run(tmp_path / "run", TILES)
    return tmp_path / "run"


def load(out: Path, name: str = "all") -> tuple[COCO, dict]:
    path = out / "annotations" / f"{name}.json"
    return COCO(str(path)), json.loads(path.read_text(encoding="utf-8"))


def union_of(coco: COCO, image: dict) -> np.ndarray:
    union = np.zeros((image["height"], image["width"]), np.uint8)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
        union |= coco.annToMask(ann)
    return union


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 1.0 if not (a | b).any() else float((a & b).sum() / (a | b).sum())


def assert_masks_match(coco: COCO, out: Path, source: Path) -> int:
    """Every image's union of annToMask equals the source row's mask (IoU >= 0.98); the
    number of images compared."""
    rows = {row["id"]: row for row in read_index(source)}
    compared = 0
    for image in coco.dataset["images"]:
        row = rows[image["histosynth"]["id"]]
        assert (out / "images" / image["file_name"]).read_bytes() == (
            source / row["image_path"]).read_bytes()
        if not image["histosynth"]["has_mask"]:
            continue
        mask = cv2.imread(str(source / row["mask_path"]), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (image["height"], image["width"])
        assert iou(union_of(coco, image), mask) >= 0.98, image["file_name"]
        compared += 1
    return compared


def test_a_run_reads_back_with_pycocotools_equal_to_its_masks(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    result = export_coco(run, out, split="none")
    coco, doc = load(out)
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["all.json"]
    by_id = {i["histosynth"]["id"]: i for i in doc["images"]}
    assert set(by_id) == {"touch", "hole", "shape", "var"}  # no rejected, no failed qc
    assert result.excluded == {"failed the content check": 1, "rejected": 1}
    assert assert_masks_match(coco, out, run) == 3
    assert doc["categories"] == [
        {"id": 1, "name": "Vessel", "supercategory": "vessel"},
        {"id": 2, "name": "Vessel: Invasive", "supercategory": "vessel"},
    ]
    assert doc["info"]["category_ids"] == {"Vessel": 1, "Vessel: Invasive": 2}
    assert doc["info"]["mpp"] == 0.5 and doc["info"]["source"] == str(run.resolve())
    assert doc["licenses"] == []
    shape = by_id["shape"]["histosynth"]
    assert shape["synthesis_type"] == "shape" and shape["slide_group"] == "B"
    assert shape["review_status"] == "accepted" and shape["qc"] == "pass"
    assert shape["source_annotation_id"] == "src-2" and shape["mpp"] == 0.5
    (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=by_id["shape"]["id"]))
    assert ann["histosynth"]["inserted"] is True and ann["histosynth"]["shape_id"] == "sketch-7"
    assert isinstance(ann["segmentation"], list) and ann["iscrowd"] == 0
    pixels = cv2.imread(str(run / "masks" / "shape.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert ann["area"] == int(pixels.sum())  # histosynth's rasterisation (pixel centres)
    assert iou(coco.annToMask(ann), pixels) >= 0.98
    ys, xs = np.nonzero(pixels)
    assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    ids = [a["id"] for a in doc["annotations"]]
    assert len(set(ids)) == len(ids) == result.annotations == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".coco.")]


def test_touching_vessels_stay_two_instances(run: Path, tmp_path: Path) -> None:
    export_coco(run, tmp_path / "coco", split="none")
    coco, doc = load(tmp_path / "coco")
    image = next(i for i in doc["images"] if i["histosynth"]["id"] == "touch")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
    assert len(anns) == 2  # the Tumor feature is not a vessel
    mask = cv2.imread(str(run / "masks" / "touch.png"), cv2.IMREAD_GRAYSCALE)
    assert cv2.connectedComponents((mask > 0).astype(np.uint8))[0] == 2  # one blob + background
    first, second = (coco.annToMask(a) for a in anns)
    assert not (first & second).any() and first.any() and second.any()
    assert {a["category_id"] for a in anns} == {1, 2}
    assert [a["histosynth"]["inserted"] for a in anns] == [True, False]


def test_a_vessel_with_a_hole_is_rle_with_the_hole_empty(run: Path, tmp_path: Path) -> None:
    export_coco(run, tmp_path / "coco", split="none")
    coco, doc = load(tmp_path / "coco")
    image = next(i for i in doc["images"] if i["histosynth"]["id"] == "hole")
    ring, edge = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
    assert isinstance(ring["segmentation"], dict) and ring["iscrowd"] == 0
    assert ring["segmentation"]["size"] == [TILE, TILE]
    pixels = coco.annToMask(ring)
    hole = rasterize(circle(32, 32, 7.5), origin=(0, 0), scale=1, shape=(TILE, TILE)) > 0
    assert hole.sum() > 100 and not pixels[hole].any()
    assert pixels[32, 32 + 14] == 1  # in the wall
    assert isinstance(edge["segmentation"], list)  # clipped to the tile, no hole
    assert max(edge["segmentation"][0][0::2]) <= TILE


def test_a_variation_is_an_image_with_its_label_and_no_instances(
    run: Path, tmp_path: Path
) -> None:
    export_coco(run, tmp_path / "coco", split="none")
    coco, doc = load(tmp_path / "coco")
    image = next(i for i in doc["images"] if i["histosynth"]["id"] == "var")
    assert coco.getAnnIds(imgIds=image["id"]) == []
    assert image["histosynth"]["has_mask"] is False
    assert image["histosynth"]["label"] == "Vessel"
    assert image["histosynth"]["label_category_id"] == 1
    masked = next(i for i in doc["images"] if i["histosynth"]["id"] == "touch")
    assert "label" not in masked["histosynth"]


def test_failed_content_check_goes_in_only_when_asked(run: Path, tmp_path: Path) -> None:
    result = export_coco(run, tmp_path / "coco", split="none", include_qc_failed=True)
    coco, doc = load(tmp_path / "coco")
    image = next(i for i in doc["images"] if i["histosynth"]["id"] == "qcfail")
    assert image["histosynth"]["qc"] == "fail: colour"
    assert len(coco.getAnnIds(imgIds=image["id"])) == 1
    assert result.excluded == {"rejected": 1}


def test_an_extract_folder_exports_with_its_real_tiles(demo_project: Path, tmp_path: Path,
                                                       invoke) -> None:
    dataset, out = tmp_path / "dataset", tmp_path / "coco"
    done = invoke("--quiet", "extract", "--project", demo_project, "--class", "Vessel",
                  "--out", dataset, "--tile-size", 256)
    assert done.exit_code == 0, done.output
    rows = read_index(dataset)
    assert rows and {r["review_status"] for r in rows} == {"pending"}  # nobody reviews real tiles
    done = invoke("export", dataset, "--format", "coco", "--split", "none", "--out", out)
    assert done.exit_code == 0, done.output
    assert f"{len(rows)} images" in done.output
    coco, doc = load(out)
    assert assert_masks_match(coco, out, dataset) == len(rows)
    assert {i["histosynth"]["synthesis_type"] for i in doc["images"]} == {"extracted"}
    several = [i for i in doc["images"] if len(coco.getAnnIds(imgIds=i["id"])) > 1]
    assert several  # tiles holding more than one vessel keep them apart


# --------------------------------------------------------------------------- splits


def split_run(folder: Path, tiles: dict[str, tuple[str, str, str]]) -> Path:
    """A run of ``id -> (kind, vessel slide, background slide)``, all accepted."""
    write_run(folder, {tid: {"kind": kind, "slides": (donor, bg),
                             "anns": [vessel(circle(32, 32, 10))]}
                       for tid, (kind, donor, bg) in tiles.items()})
    return folder


def read_splits(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "annotations").glob("*.json")}


def slides_of(doc: dict) -> set[str]:
    return {i["histosynth"]["slide_group"] for i in doc["images"]} | {
        Path(i["histosynth"]["source_image"]).stem for i in doc["images"]}


def test_slide_split_follows_the_benchmarks_leakage_rules(tmp_path: Path) -> None:
    tiles = {f"real-{s}{k}": ("extracted", s, s) for s in "PQRSTUV" for k in range(2)}
    tiles |= {f"syn-{d}{b}": ("inpainting", d, b) for d, b in ("PP", "PQ", "QR", "SU", "VV")}
    run = split_run(tmp_path / "run", tiles)
    out = tmp_path / "coco"
    result = export_coco(run, out)  # split="slide" is the default
    docs = read_splits(out)
    assert set(docs) == {"train", "val", "test"} == set(result.by_split)
    groups = {name: {i["histosynth"]["slide_group"] for i in doc["images"]}
              for name, doc in docs.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not groups[a] & groups[b], (a, b)
        assert not slides_of(docs[a]) & slides_of(docs[b]), (a, b)
    for name in ("val", "test"):
        assert {i["histosynth"]["synthesis_type"] for i in docs[name]["images"]} == {"extracted"}
    placed = {i["histosynth"]["id"] for doc in docs.values() for i in doc["images"]}
    left = {i for i, _ in result.left_out}
    assert placed | left == set(tiles) and not placed & left and left
    assert {d["id"] for d in docs["train"]["info"]["split_rule"]["left_out"]} == left
    image_ids = [i["id"] for doc in docs.values() for i in doc["images"]]
    assert len(set(image_ids)) == len(image_ids)
    assert len({json.dumps(doc["categories"]) for doc in docs.values()}) == 1
    for name in docs:
        COCO(str(out / "annotations" / f"{name}.json"))  # each file loads on its own


def test_a_synthetic_only_run_splits_by_connected_slides(tmp_path: Path) -> None:
    tiles = {"t1": ("inpainting", "A", "A"), "t2": ("inpainting", "B", "C"),
             "t3": ("shape", "C", "C"), "t4": ("inpainting", "D", "D"),
             "t5": ("inpainting", "E", "E"), "t6": ("inpainting", "F", "F")}
    out = tmp_path / "coco"
    result = export_coco(split_run(tmp_path / "run", tiles), out)
    docs = read_splits(out)
    assert set(docs) == {"train", "val", "test"} and result.left_out == []
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not slides_of(docs[a]) & slides_of(docs[b]), (a, b)
    side = {i["histosynth"]["id"]: name for name, doc in docs.items() for i in doc["images"]}
    assert side["t2"] == side["t3"]  # B and C are joined by t2
    assert sum(len(doc["images"]) for doc in docs.values()) == len(tiles)


def test_too_few_slides_to_split_is_one_line_and_nothing_written(
    run: Path, tmp_path: Path, invoke
) -> None:
    out = tmp_path / "coco"
    done = invoke("export", run, "--format", "coco", "--out", out)
    assert done.exit_code == 1
    assert "at least 3 slide groups" in done.stderr and "--split none" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".coco.*"))
    assert invoke("export", run, "--split", "none", "--out", out).exit_code == 2  # coco only
    assert not out.exists()


# --------------------------------------------------------------------------- bad input


def break_image(run: Path) -> str:
    path = run / "images" / "hole.png"
    path.write_bytes(path.read_bytes() + b"\0")
    return "SHA-256"


def remove_image(run: Path) -> str:
    (run / "images" / "hole.png").unlink()
    return "missing"


def unreadable_geojson(run: Path) -> str:
    path = run / "annotations" / "hole.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [', encoding="utf-8")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    update_index(run, {"hole": {"annotation_sha256": digest}})
    return "JSON"


@pytest.mark.parametrize("damage", [break_image, remove_image, unreadable_geojson])
def test_bad_input_is_one_line_naming_file_and_row(run: Path, tmp_path: Path, invoke,
                                                   damage) -> None:
    words = damage(run)
    out = tmp_path / "coco"
    with pytest.raises(InputError) as caught:
        export_coco(run, out, split="none")
    assert "hole" in str(caught.value) and words in str(caught.value)
    done = invoke("export", run, "--format", "coco", "--split", "none", "--out", out)
    assert done.exit_code == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "hole" in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".coco.*"))


# --------------------------------------------------------------------------- RLE helpers


masks = st.tuples(st.integers(0, 24), st.integers(0, 24)).flatmap(
    lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1))
)


@settings(max_examples=200, deadline=None)
@given(mask=masks)
def test_encode_rle_is_pycocotools_encode_and_decode_inverts_it(mask: np.ndarray) -> None:
    ours = encode_rle(mask)
    theirs = coco_mask.encode(np.asfortranarray(mask))
    assert ours == {"size": [int(v) for v in theirs["size"]],
                    "counts": theirs["counts"].decode("ascii")}
    assert np.array_equal(decode_rle(ours), mask)
    assert decode_rle(ours).dtype == np.uint8
    if mask.size:
        assert np.array_equal(coco_mask.decode(dict(ours, counts=ours["counts"].encode())), mask)
        assert coco_mask.area(theirs) == mask.sum()


@settings(max_examples=100, deadline=None)
@given(
    centre=st.tuples(st.floats(12, 36), st.floats(12, 36)),
    radii=st.lists(st.floats(2, 11), min_size=3, max_size=10),
    turn=st.floats(0, 6.28),
)
def test_mask_from_polygons_agrees_with_pycocotools_off_the_outline(centre, radii, turn) -> None:
    angles = turn + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    xy = np.c_[centre[0] + np.cos(angles) * radii, centre[1] + np.sin(angles) * radii]
    flat = xy.ravel().tolist()
    ours = mask_from_polygons([flat], 48, 48)
    theirs = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([flat], 48, 48)))
    outline = Polygon(xy).exterior
    for i, j in zip(*np.nonzero(ours != theirs), strict=True):
        assert outline.distance(Point(j + 0.5, i + 0.5)) < 0.25  # a pixel centre on the edge


def test_decode_rle_refuses_counts_that_do_not_fill_the_size() -> None:
    with pytest.raises(ValueError, match="add up"):
        decode_rle({"size": [4, 4], "counts": [3, 4]})
    with pytest.raises(ValueError, match="exceeds"):
        decode_rle({"size": [10**6, 10**6], "counts": [10**12]})
    assert decode_rle({"size": [2, 2], "counts": [1, 2, 1]}).tolist() == [[0, 1], [1, 0]]


def test_category_ids_are_sorted_names_from_one() -> None:
    assert category_ids(["b", "a", "b", "Vessel"]) == {"Vessel": 1, "a": 2, "b": 3}
