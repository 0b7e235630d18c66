"""TIAToolbox pipelines call histosynth: ``histosynth.tiatoolbox.SynthesisEngine``.

A real TIAToolbox ``SemanticSegmentor`` with a tiny ``ModelABC`` vessel model (a pale-lumen
rule inside ``infer_batch``) segments a real pyramidal demo slide into an
``AnnotationStore``; ``SynthesisEngine`` (tiny, UNTRAINED engine) consumes that store; a
TIAToolbox ``PatchDataset`` is built from the synthetic tiles and loads. No mocks: this
Python's ``sqlite3`` may lack ``enable_load_extension``, as a user's may, and the test
does what such a user does (``tiatoolbox_sqlite_compat()`` around TIAToolbox's engine).
The README's TIAToolbox snippet is executed as printed.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shapely.geometry import Polygon, box
from shapely.ops import unary_union
from tiatoolbox.annotation.storage import SQLiteStore
from tiatoolbox.models.dataset import PatchDataset
from tiatoolbox.models.engine.io_config import IOSegmentorConfig
from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
from tiatoolbox.models.models_abc import ModelABC
from tiatoolbox.wsicore.wsireader import WSIReader

from histosynth.integration.annotations import Annotation, class_matches
from histosynth.integration.dataset import read_index
from histosynth.integration.demo.data import build_demo_slide
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import read_annotations, write_annotations
from histosynth.integration.masks import rasterize
from histosynth.integration.stores import (
    annotations_to_store,
    open_store,
    tiatoolbox_sqlite_compat,
)
from histosynth.tiatoolbox import STORE_NAME, SynthesisEngine, store_key_id

ROOT = Path(__file__).resolve().parents[2]
TILE = 256
SEG_MPP = 2.0  # µm/px at which the vessel model sees the slide


# --------------------------------------------------------------------------- the model


class LumenModel(ModelABC):
    """A tiny vessel model: vessel lumens are pale, unsaturated and compact.

    ``forward`` thresholds brightness and saturation (tensors); ``infer_batch`` removes
    specks and irregular gaps (area < 200 µm², solidity < 0.8 at 2 µm/px) and returns
    (N, H, W, 2) probabilities (background, vessel); ``postproc`` takes the argmax.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("limits", torch.tensor([0.8, 0.18]))  # brightness, saturation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.float() / 255
        high = rgb.max(-1).values
        saturation = (high - rgb.min(-1).values) / high.clamp(min=1e-6)
        return (rgb.mean(-1) > self.limits[0]) & (saturation < self.limits[1])

    @staticmethod
    def infer_batch(model: torch.nn.Module, batch_data, *, device: str) -> np.ndarray:
        with torch.inference_mode():
            lumens = model(torch.as_tensor(batch_data).to(device)).cpu().numpy()
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        out = []
        for lumen in lumens.astype(np.uint8):
            lumen = cv2.morphologyEx(lumen, cv2.MORPH_OPEN, kernel)
            contours, _ = cv2.findContours(lumen, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            vessel = np.zeros_like(lumen)
            for contour in contours:
                area = cv2.contourArea(contour)
                hull = cv2.contourArea(cv2.convexHull(contour))
                if area * SEG_MPP**2 >= 200 and hull > 0 and area / hull >= 0.8:
                    cv2.drawContours(vessel, [contour], -1, 1, thickness=-1)
            p = vessel.astype(np.float32)
            out.append(np.stack([1 - p, p], axis=-1))
        return np.stack(out)

    @staticmethod
    def postproc(image):
        return image.argmax(axis=-1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    return build_demo_slide(folder / "demo.ome.tif", width=2048, height=1536, seed=1)


@pytest.fixture(scope="module")
def segmented(slide, tmp_path_factory) -> Path:
    """The TIAToolbox pipeline: SemanticSegmentor → AnnotationStore (.db)."""
    out = tmp_path_factory.mktemp("seg") / "segmentation"
    segmentor = SemanticSegmentor(
        model=LumenModel(), batch_size=2, num_workers=0, device="cpu", verbose=False
    )
    at = [{"units": "mpp", "resolution": SEG_MPP}]
    ioconfig = IOSegmentorConfig(
        input_resolutions=at,
        output_resolutions=at,
        patch_input_shape=(128, 128),
        patch_output_shape=(128, 128),
        stride_shape=(128, 128),
    )
    with tiatoolbox_sqlite_compat():
        result = segmentor.run(
            [slide.path],
            patch_mode=False,
            ioconfig=ioconfig,
            save_dir=out,
            output_type="annotationstore",
            auto_get_mask=False,
        )
    db = Path(result[slide.path])
    assert db.suffix == ".db" and db.is_file()
    return db


@pytest.fixture(scope="module")
def engine():
    return SynthesisEngine(model="tiny", batch_size=1, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def pipeline(engine, slide, segmented, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("synth") / "run"
    store = engine.run(
        [slide.path],
        annotations=[segmented],
        classes=["Vessel"],
        count=2,
        mode="inpaint",
        save_dir=save_dir,
        output_type="annotationstore",
        seed=0,
        tile_size=TILE,
        steps=2,
        class_dict={1: "Vessel"},
    )
    return store, save_dir


def _store_rows(db: Path) -> list[tuple[str, object]]:
    store = open_store(db, create=False)
    try:
        return [(str(k), a) for k, a in store.items()]
    finally:
        store.close()


# --------------------------------------------------------------------------- the pipeline


def test_the_segmentor_finds_real_vessels_and_stores_class_indices(slide, segmented):
    rows = _store_rows(segmented)
    # TIAToolbox writes the class index (no class names given): histosynth needs class_dict
    assert {a.properties["type"] for _, a in rows} <= {0, 1}
    vessels = [a.geometry for _, a in rows if a.properties["type"] == 1 and a.geometry.area > 0]
    truth = unary_union(
        [a.geometry for a in slide.annotations if class_matches(a.class_name, "Vessel")]
    )
    inside = [g for g in vessels if g.intersection(truth).area > 0.5 * g.area]
    assert len(vessels) >= 3 and len(inside) >= 3
    assert unary_union(vessels).intersection(truth).area > 0.5 * unary_union(vessels).area


def test_pipeline_store_to_synthetic_store_to_patch_dataset(pipeline, slide, segmented):
    store, save_dir = pipeline
    assert isinstance(store, SQLiteStore)
    rows = read_index(save_dir)
    ids = [row["id"] for row in rows]
    assert ids == ["inp-00000", "inp-00001"]
    # the store is saved in the run folder and reads back the same
    saved = _store_rows(save_dir / STORE_NAME)
    assert len(saved) == len(store) > 0
    keys = {key for key, _ in _store_rows(segmented)}
    donors = {store_key_id(key) for key in keys}

    by_tile: dict[str, list] = {}
    for _, ann in saved:
        props = ann.properties
        by_tile.setdefault(props["tile_id"], []).append(ann)
        assert props["type"] == "Vessel" and props["classification"]["name"] == "Vessel"
        assert props["synthetic"] is True and props["run"] == save_dir.name
        assert props["source_image"] == str(slide.path)
        assert props["source_annotation_id"] in donors
        assert props["model"].startswith("tiny") and props["review_status"] == "pending"
        assert props["tile_size"] == TILE and props["mpp"] == 0.5
        uuid.UUID(props["histosynth_id"])
        # tile pixel coordinates
        minx, miny, maxx, maxy = ann.geometry.bounds
        assert 0 <= minx < maxx <= TILE and 0 <= miny < maxy <= TILE
    assert sorted(by_tile) == ids
    for row in rows:
        anns = by_tile[row["id"]]
        assert sum(a.properties["inserted"] for a in anns) == 1
        assert all(a.properties["seed"] == int(row["seed"]) for a in anns)
        assert all(a.properties["tile_x"] == int(row["tile_x"]) for a in anns)
        # the store's polygons are the tile's mask
        mask = cv2.imread(str(save_dir / row["mask_path"]), cv2.IMREAD_UNCHANGED)
        drawn = rasterize([a.geometry for a in anns], origin=(0, 0), scale=1.0, shape=mask.shape)
        assert ((drawn > 0) == (mask > 0)).mean() > 0.995
        # and the store selects one tile like any TIAToolbox store
        assert len(store.query(where=f"props['tile_id'] == '{row['id']}'")) == len(anns)

    # a TIAToolbox patch dataset over the synthetic tiles loads
    dataset = PatchDataset(
        inputs=[save_dir / row["image_path"] for row in rows],
        labels=[row["class_name"] for row in rows],
        patch_input_shape=(TILE, TILE),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0)
    batches = list(loader)
    assert len(batches) == 1
    assert tuple(batches[0]["image"].shape) == (2, TILE, TILE, 3)
    assert batches[0]["image"].dtype == torch.uint8
    assert list(batches[0]["label"]) == ["Vessel", "Vessel"]


def test_dict_output_from_a_reader_and_a_store_object_is_the_same_run(
    engine, pipeline, slide, segmented, tmp_path
):
    _, first = pipeline
    reader = WSIReader.open(slide.path)
    with tiatoolbox_sqlite_compat():
        store = SQLiteStore(segmented)
    try:
        out = engine.run(
            reader,
            annotations=store,
            classes="Vessel",
            count=2,
            save_dir=tmp_path / "run",
            output_type="dict",
            seed=0,
            tile_size=TILE,
            steps=2,
            class_dict={"1": "Vessel"},
        )
    finally:
        store.close()
    assert set(out) == {"images", "masks", "has_mask", "records", "save_dir"}
    assert out["has_mask"].tolist() == [True, True]  # inpainted: the placed donor's mask
    assert out["images"].shape == (2, TILE, TILE, 3) and out["images"].dtype == np.uint8
    assert out["masks"].shape == (2, TILE, TILE) and set(np.unique(out["masks"])) <= {0, 255}
    assert [r["id"] for r in out["records"]] == ["inp-00000", "inp-00001"]
    png = cv2.imread(str(out["save_dir"] / out["records"][1]["image_path"]))
    assert np.array_equal(out["images"][1], cv2.cvtColor(png, cv2.COLOR_BGR2RGB))
    # same inputs (as objects instead of paths) and seed: the same tiles
    before = {r["id"]: r["image_sha256"] for r in read_index(first)}
    assert {r["id"]: r["image_sha256"] for r in out["records"]} == before


def test_qupath_output_from_geojson_in_variation_mode(engine, slide, tmp_path):
    geojson = tmp_path / "demo.geojson"
    write_annotations(geojson, slide.annotations)
    paths = engine.run(
        [str(slide.path)],
        annotations=[geojson],
        classes=["Vessel"],
        count=1,
        mode="variation",
        save_dir=tmp_path / "run",
        output_type="qupath",
        seed=3,
        tile_size=TILE,
        steps=2,
        allow_untrained=True,
    )
    assert paths == [tmp_path / "run" / "annotations" / "var-00000.geojson"]
    document = json.loads(paths[0].read_text())
    # a variation's pixels are generated: no outline (it would not match them), its class
    # in the index; the untrained engine's tile fails the content check
    assert document["type"] == "FeatureCollection" and document["features"] == []
    assert read_annotations(paths[0]) == []
    (row,) = read_index(tmp_path / "run")
    assert class_matches(row["class_name"], "Vessel") and row["mask_source"] == "none"
    assert row["qc"].startswith("fail: ")
    assert row["synthesis_type"] == "variation" and row["source_image"] == str(slide.path)
    assert row["source_annotation_id"] in {a.id for a in slide.annotations}


def test_shape_mode_takes_sketches_from_a_store(engine, slide, tmp_path):
    """``mode="shape"``: a ``Vessel sketch`` in the annotation store becomes one tile whose
    mask is the sketch (tile px), its row ``shape`` with the sketch's id."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    outline = Polygon(np.stack([1000 + 150 * np.cos(t), 760 + 80 * np.sin(t)], axis=1))
    sketch = Annotation(geometry=outline, class_name="Vessel sketch",
                        id="00000000-0000-4000-8000-0000000000aa")
    db = tmp_path / "with-sketch.db"
    annotations_to_store([*slide.annotations, sketch], db).close()
    out = engine.run(
        [slide.path], annotations=[db], classes=["Vessel"], mode="shape", shapes="drawn",
        save_dir=tmp_path / "run", tile_size=TILE, harmonise="multiband",
    )
    (record,) = out["records"]
    assert record["synthesis_type"] == "shape" and record["shape_id"] == sketch.id
    scale = 0.25 / float(record["mpp"])
    wanted = rasterize([outline], origin=(float(record["tile_x"]), float(record["tile_y"])),
                       scale=scale, shape=(TILE, TILE)) > 0
    got = (out["masks"][0] > 0) & (cv2.dilate(wanted.astype(np.uint8), np.ones((5, 5))) > 0)
    assert (got & wanted).sum() / (got | wanted).sum() >= 0.98
    with pytest.raises(InputError, match="needs --shapes"):
        engine.run([slide.path], annotations=[db], classes=["Vessel"], mode="shape", count=1,
                   save_dir=tmp_path / "bad", tile_size=TILE)


# --------------------------------------------------------------------------- bad input


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_store_without_the_class_names_the_store_and_its_classes(
    engine, slide, segmented, tmp_path
):
    with pytest.raises(InputError) as exc:
        engine.run(
            [slide.path],
            annotations=[segmented],
            classes=["Tumor"],
            count=1,
            save_dir=tmp_path / "run",
            class_dict={0: "background", 1: "Vessel"},
        )
    text = _one_line(exc)
    assert str(segmented) in text and "'Tumor'" in text
    assert "'Vessel'" in text and "'background'" in text
    # without class_dict the store holds indices only: the message says what to do
    with pytest.raises(InputError) as exc:
        engine.run(
            [slide.path],
            annotations=[segmented],
            classes=["Vessel"],
            count=1,
            save_dir=tmp_path / "run",
        )
    text = _one_line(exc)
    assert str(segmented) in text and "'1'" in text and "class_dict" in text
    assert not (tmp_path / "run").exists()


def test_images_and_annotations_of_different_lengths(engine, slide, segmented, tmp_path):
    with pytest.raises(InputError) as exc:
        engine.run(
            [slide.path, slide.path],
            annotations=[segmented],
            classes=["Vessel"],
            count=1,
            save_dir=tmp_path / "run",
        )
    assert re.search(r"2 image\(s\), 1 annotation", _one_line(exc))
    assert not (tmp_path / "run").exists()


def test_a_store_outside_the_slide_names_the_store_and_the_annotation(engine, slide, tmp_path):
    db = tmp_path / "other-slide.db"
    far = Annotation(box(5000, 5000, 5200, 5200), class_name="Vessel")
    near = Annotation(Polygon([(100, 100), (300, 100), (200, 250)]), class_name="Vessel")
    annotations_to_store([near, far], db).close()
    with pytest.raises(InputError) as exc:
        engine.run(
            [slide.path],
            annotations=[db],
            classes=["Vessel"],
            count=1,
            save_dir=tmp_path / "run",
        )
    text = _one_line(exc)
    assert str(db) in text and f"annotation {far.id}" in text
    assert "outside the slide demo.ome.tif (2048×1536 px)" in text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_type": "zarr"}, "output_type must be one of"),
        ({"stepz": 3}, "unknown parameter(s) stepz"),
        ({"class_dict": {1: ""}}, "class_dict[1] must be a class name"),
    ],
)
def test_bad_settings(engine, slide, segmented, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        engine.run(
            [slide.path],
            annotations=[segmented],
            classes=["Vessel"],
            count=1,
            save_dir=tmp_path / "run",
            **kwargs,
        )


def test_a_wrong_annotation_input(engine, slide, tmp_path):
    with pytest.raises(InputError, match=r"annotations\[0\]: expected an AnnotationStore"):
        engine.run(
            [slide.path], annotations=[42], classes=["Vessel"], count=1, save_dir=tmp_path / "run"
        )
    with pytest.raises(InputError, match="annotation file not found"):
        engine.run(
            [slide.path],
            annotations=[tmp_path / "missing.db"],
            classes=["Vessel"],
            count=1,
            save_dir=tmp_path / "run",
        )


# --------------------------------------------------------------------------- README


def readme_snippet() -> tuple[str, str]:
    """The python block of README.md's "## TIAToolbox" section, else of docs/tiatoolbox.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## TIAToolbox\s*$(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if section:
        text, origin = section.group(1), "README.md"
    else:
        origin = "docs/tiatoolbox.md"
        text = (ROOT / origin).read_text(encoding="utf-8")
    block = re.search(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert block, f"no python block in {origin}'s TIAToolbox section"
    return block.group(1), origin


def test_the_readme_snippet_runs_as_printed(tmp_path, monkeypatch, capsys):
    code, origin = readme_snippet()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{origin} (TIAToolbox)", "exec"), {"__name__": "readme_snippet"})
    printed = capsys.readouterr().out
    match = re.search(r"(\d+) annotations on (\d+) synthetic tiles", printed)
    assert match and int(match.group(1)) >= 2 and int(match.group(2)) == 2
    assert (tmp_path / "synthetic" / STORE_NAME).is_file()
    assert len(read_index(tmp_path / "synthetic")) == 2
