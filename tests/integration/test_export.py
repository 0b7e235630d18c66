"""Export of a reviewed run as an image-folder training set: accepted (and optionally
pending) tiles only, never rejected ones; exact copies checked against the index's SHA-256;
atomic (all or nothing); readable with csv and, when installed, Hugging Face datasets."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import Point

from histosynth.commands.export import export
from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord, read_index, update_index
from histosynth.integration.demo.data import he_source_image
from histosynth.integration.errors import InputError
from histosynth.integration.splits import slide_group
from histosynth.workflows.export import METADATA_COLUMNS, export_training_set

TILE = 48
# id -> (synthesis_type, class, review status)
TILES = {
    "inp-0": ("inpainting", "Vessel: Invasive", "accepted"),
    "inp-1": ("inpainting", "Vessel", "rejected"),
    "var-0": ("variation", "Vessel: Invasive", "pending"),
    "ext-0": ("extracted", "Vessel <b>\"odd\", name</b>", "accepted"),
    "ext-1": ("extracted", "Vessel", "pending"),
    "ext-2": ("extracted", "Vessel", "rejected"),
}


def build_run(run: Path) -> None:
    he = he_source_image()
    vessel = [Annotation(geometry=Point(24, 24).buffer(10), class_name="Vessel")]
    with RunWriter(
        run, config={"mode": "test"}, extra_columns=("donor_image", "donor_entry_id")
    ) as writer:
        for k, (tile_id, (kind, class_name, _)) in enumerate(TILES.items()):
            donor = "" if kind == "extracted" else "/slides/donor-A.svs"
            source = "/slides/background-B.svs" if kind == "inpainting" else f"C:\\s\\real-{k}.tif"
            mask = np.zeros((TILE, TILE), np.uint8)
            cv2.circle(mask, (24, 24), 6 + k, 255, -1)
            refs = {"reference": he[:TILE, :TILE].copy()} if kind == "variation" else None
            writer.add_tile(
                TileRecord(
                    id=tile_id,
                    synthesis_type=kind,
                    class_name=class_name,
                    source_image=source,
                    source_entry_id=str(k),
                    tile_x=100 * k,
                    tile_y=50 * k,
                    tile_size=TILE,
                    mpp=0.5,
                    model="" if kind == "extracted" else "pixcell-256",
                    seed=None if kind == "extracted" else 10 + k,
                    extra={"donor_image": donor, "donor_entry_id": "1" if donor else ""},
                ),
                np.ascontiguousarray(he[60 * k : 60 * k + TILE, 70 * k : 70 * k + TILE]),
                mask,
                vessel,
                refs=refs,
            )
    update_index(
        run, {tid: {"review_status": status} for tid, (_, _, status) in TILES.items()}
    )


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    build_run(folder)
    return folder


def read_metadata(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "train" / "metadata.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def ids_with(*statuses: str) -> set[str]:
    return {tid for tid, (_, _, status) in TILES.items() if status in statuses}


def leftovers(parent: Path, out: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_accepted_only_by_default(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    result = export_training_set(run, out)
    assert result.out_dir == out and result.count == 2
    assert result.by_status == {"accepted": 2}
    assert result.excluded == {"pending": 2, "rejected": 2}

    header, rows = read_metadata(out)
    assert header[0] == "file_name" and header == list(METADATA_COLUMNS)
    assert "slide_group" in header and "mask_path" in header
    assert not [name for name in header if name.endswith("_file_name")]  # see export.py
    assert {row["id"] for row in rows} == ids_with("accepted")
    assert {p.stem for p in (out / "train").glob("*.png")} == ids_with("accepted")
    assert {p.stem for p in (out / "masks").glob("*.png")} == ids_with("accepted")

    index = {row["id"]: row for row in read_index(run)}
    for row in rows:
        source = index[row["id"]]
        image = out / "train" / row["file_name"]
        assert image.read_bytes() == (run / source["image_path"]).read_bytes()
        mask = out / row["mask_path"]
        assert mask == out / "masks" / f"{row['id']}.png"
        assert mask.read_bytes() == (run / source["mask_path"]).read_bytes()
        geojson = out / row["annotation_path"]
        assert json.loads(geojson.read_text())["type"] == "FeatureCollection"
        assert row["class_name"] == source["class_name"]
        assert row["review_status"] == "accepted"
        assert row["image_sha256"] == source["image_sha256"]
    by_id = {row["id"]: row for row in rows}
    assert by_id["inp-0"]["slide_group"] == "donor-A"  # the donor's slide, not the background
    assert by_id["inp-0"]["source_image"] == "/slides/background-B.svs"
    assert by_id["ext-0"]["slide_group"] == "real-3"  # a Windows path's stem
    assert by_id["ext-0"]["class_name"] == 'Vessel <b>"odd", name</b>'

    info = json.loads((out / "export.json").read_text())
    assert info["count"] == 2 and info["review_statuses"] == ["accepted"]
    assert set(info["columns"]) == set(METADATA_COLUMNS)
    readme = (out / "README.md").read_text()
    assert "slide_group" in readme and "Rejected tiles are" in readme
    assert leftovers(tmp_path, out) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_include_pending_never_rejected(run: Path, tmp_path: Path) -> None:
    # a rejected tile is never read: its image may even be missing
    (run / "images" / "ext-2.png").unlink()
    out = tmp_path / "dataset"
    result = export_training_set(run, out, include_pending=True)
    _, rows = read_metadata(out)
    assert {row["id"] for row in rows} == ids_with("accepted", "pending")
    assert result.by_status == {"accepted": 2, "pending": 2}
    assert result.excluded == {"rejected": 2}
    assert not (out / "train" / "inp-1.png").exists()
    assert {row["review_status"] for row in rows} == {"accepted", "pending"}
    assert {row["slide_group"] for row in rows if row["id"] == "var-0"} == {"donor-A"}


def test_an_empty_out_folder_is_used(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert export_training_set(run, out).count == 2
    assert (out / "train" / "metadata.csv").is_file()


def test_sha_mismatch_names_the_file_and_writes_nothing(run: Path, tmp_path: Path) -> None:
    image = run / "images" / "ext-0.png"
    pixels = cv2.imread(str(image), cv2.IMREAD_COLOR)
    pixels[0, 0] ^= 1
    cv2.imwrite(str(image), pixels)
    out = tmp_path / "dataset"
    with pytest.raises(InputError) as caught:
        export_training_set(run, out)
    assert str(image) in str(caught.value) and "ext-0" in str(caught.value)
    assert "SHA-256" in str(caught.value)
    assert not out.exists() and leftovers(tmp_path, out) == []


@pytest.mark.parametrize("what", ["mask", "annotation"])
def test_a_changed_mask_or_annotation_is_refused(run: Path, tmp_path: Path, what: str) -> None:
    """The index records what the run wrote (mask_sha256, annotation_sha256): a mask or
    outline edited, or swapped, after the run is not exported as its label."""
    if what == "mask":
        changed = run / "masks" / "ext-0.png"
        mask = cv2.imread(str(changed), cv2.IMREAD_UNCHANGED)
        mask[:4, :4] = 255
        cv2.imwrite(str(changed), mask)
    else:
        changed = run / "annotations" / "ext-0.geojson"
        changed.write_text(changed.read_text().replace("Vessel", "Tumor"))
    out = tmp_path / "dataset"
    with pytest.raises(InputError) as caught:
        export_training_set(run, out)
    assert str(changed) in str(caught.value) and "ext-0" in str(caught.value)
    assert f"{what}_sha256" in str(caught.value)
    assert not out.exists() and leftovers(tmp_path, out) == []


def test_an_older_run_without_file_hashes_exports_with_a_warning(run, tmp_path, caplog):
    import csv as csv_module

    index = run / "index.csv"
    with open(index, newline="", encoding="utf-8") as handle:
        rows = list(csv_module.reader(handle))
    keep = [k for k, name in enumerate(rows[0]) if not name.endswith("_sha256")
            or name == "image_sha256"]
    with open(index, "w", newline="", encoding="utf-8") as handle:
        csv_module.writer(handle, lineterminator="\r\n").writerows(
            [[row[k] for k in keep] for row in rows])
    assert export_training_set(run, tmp_path / "dataset").count == 2
    assert "records no mask / annotation hashes" in caplog.text


def test_a_fifo_named_by_the_index_is_refused_not_waited_on(run: Path, tmp_path: Path) -> None:
    mask = run / "masks" / "ext-0.png"
    mask.unlink()
    os.mkfifo(mask)
    out = tmp_path / "dataset"
    with pytest.raises(InputError) as caught:
        export_training_set(run, out)
    assert str(mask) in str(caught.value)
    assert not out.exists()


def test_existing_non_empty_out_is_refused(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_training_set(run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, out) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        export_training_set(run, a_file)


@pytest.mark.parametrize("bad", ["../outside.png", "/abs/inp-0.png", "C:/x.png", ".", ""])
def test_index_paths_must_stay_inside_the_run(run: Path, tmp_path: Path, bad: str) -> None:
    update_index(run, {"inp-0": {"image_path": bad}})
    (tmp_path / "outside.png").write_bytes((run / "images" / "inp-0.png").read_bytes())
    out = tmp_path / "dataset"
    with pytest.raises(InputError, match="not a path inside the run folder"):
        export_training_set(run, out)
    assert not out.exists()


def test_missing_accepted_mask_is_an_error(run: Path, tmp_path: Path) -> None:
    (run / "masks" / "inp-0.png").unlink()
    with pytest.raises(InputError, match="mask file is missing"):
        export_training_set(run, tmp_path / "dataset")


def test_jpeg_export(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    export_training_set(run, out, image_format="jpeg")
    _, rows = read_metadata(out)
    assert {row["file_name"] for row in rows} == {"inp-0.jpg", "ext-0.jpg"}
    index = {row["id"]: row for row in read_index(run)}
    for row in rows:
        jpeg = cv2.imread(str(out / "train" / row["file_name"]), cv2.IMREAD_COLOR)
        png = cv2.imread(str(run / index[row["id"]]["image_path"]), cv2.IMREAD_COLOR)
        assert jpeg.shape == png.shape
        assert np.abs(jpeg.astype(int) - png.astype(int)).mean() < 6
    with pytest.raises(InputError, match="image format"):
        export_training_set(run, tmp_path / "other", image_format="gif")


def test_slide_group_fallbacks() -> None:
    assert slide_group({"donor_image": "/a/donor.ome.tif", "source_image": "/b/bg.svs"}) == (
        "donor.ome"
    )
    assert slide_group({"donor_image": "", "source_image": "file:/b/bg.svs"}) == "bg"
    assert slide_group({"source_image": "", "source_entry_id": "7"}) == "entry-7"
    assert slide_group({}) == ""


def test_cli_export(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    result = CliRunner().invoke(
        export, [str(run), "--out", str(out), "--include-pending"], obj={"quiet": True}
    )
    assert result.exit_code == 0, result.output
    assert "4 tiles written" in result.output and "2 rejected" in result.output
    _, rows = read_metadata(out)
    assert len(rows) == 4
    again = CliRunner().invoke(export, [str(run), "--out", str(out)])
    assert isinstance(again.exception, InputError)


def test_hugging_face_imagefolder_loads_it(run: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets not installed")
    out = tmp_path / "dataset"
    export_training_set(run, out, include_pending=True)
    train = datasets.load_dataset("imagefolder", data_dir=str(out))["train"]
    assert len(train) == 4
    assert {"image", "id", "slide_group", "class_name"} <= set(train.column_names)
    example = train[0]
    assert example["image"].size == (TILE, TILE)
    masks = train.map(lambda row: {"mask": str(out / row["mask_path"])})
    masks = masks.cast_column("mask", datasets.Image())
    assert masks[0]["mask"].size == (TILE, TILE) and masks[0]["mask"].mode == "L"


def test_cli_says_how_many_are_pending_and_how_to_include_them(run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(export, [str(run), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "2 tiles written" in result.output
    assert "2 tile(s) are pending review" in result.output
    assert "--include-pending" in result.output and "review sync" in result.output
    included = CliRunner().invoke(
        export, [str(run), "--out", str(tmp_path / "e"), "--include-pending"]
    )
    assert included.exit_code == 0 and "pending review" not in included.output
