"""Project write-back (contracts.md "Project write-back") and review sync, on real files:
a demo QuPath project, a run folder written by RunWriter with real H&E tiles, the
QuPath-written fixture projects, TIFFs read back through TIAToolbox."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord, read_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide, he_source_image
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import read_annotations
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.qupath.gson import append_entries_text
from histosynth.integration.qupath.paquo_backend import qupath_available
from histosynth.integration.qupath.paquo_writer import write_run_with_paquo
from histosynth.integration.qupath.server import BIOFORMATS_BUILDER
from histosynth.integration.qupath.uris import path_to_uri
from histosynth.integration.qupath.writeback import (
    MAPPING_NAME,
    review_sync,
    write_run_to_project,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qupath"
TILE = 160  # not a multiple of the TIFF tile: edge tiles are padded
ENTRY_KEYS = [
    "serverBuilder",
    "entryID",
    "randomizedName",
    "imageName",
    "description",
    "metadata",
    "tags",
]


def _fixtures() -> Path:
    """``tests/fixtures/qupath``: project files written by real QuPath versions."""
    return FIXTURES


# ------------------------------------------------------------------ test data


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """A demo slide (built once), and a run folder with three synthetic tiles and one
    extracted tile (real H&E pixels, masks, GeoJSON)."""
    base = tmp_path_factory.mktemp("writeback")
    slide = build_demo_slide(base / "slides" / "demo.ome.tif", width=1024, height=768, seed=3)
    he = he_source_image()
    run = base / "run-a"
    rows = [
        ("t0001", "inpainting", 0.5, "Vessel"),
        ("t0002", "variation", 0.25, "Vessel: Invasive"),
        ("x0001", "extracted", 0.5, "Vessel"),
        ("t0003", "inpainting", 0.5, "Vessel"),
    ]
    with RunWriter(run, config={"mode": "test"}) as writer:
        for number, (tile_id, kind, mpp, class_name) in enumerate(rows):
            image = np.ascontiguousarray(he[number * 40 : number * 40 + TILE, 100 : 100 + TILE])
            mask = np.zeros((TILE, TILE), np.uint8)
            cv2.circle(mask, (80, 80), 30 + number, 255, -1)
            vessel = Annotation(
                Polygon([(50, 50), (110, 52), (112, 108), (48, 110)]),
                class_name=class_name,
                color=(200, 0, 0),
            )
            other = Annotation(box(0, 0, 20, 30), class_name="Vessel", color=(200, 0, 0))
            writer.add_tile(
                TileRecord(
                    id=tile_id,
                    synthesis_type=kind,
                    class_name=class_name,
                    source_image="demo.ome.tif",
                    source_entry_id="1",
                    tile_x=100 + number,
                    tile_y=200,
                    tile_size=TILE,
                    mpp=mpp,
                    model="tiny" if kind != "extracted" else "",
                    seed=number if kind != "extracted" else None,
                ),
                image,
                mask,
                [vessel, other],
            )
    return {"slide_path": slide.path, "run": run, "base": base, "slide": slide}


@pytest.fixture
def setup(templates, tmp_path) -> tuple[Path, Path]:
    """A fresh demo project and a fresh copy of the run: (project file, run folder)."""
    project = build_demo_project(tmp_path / "project", slide=templates["slide"])
    run = tmp_path / "run-a"
    shutil.copytree(templates["run"], run)
    return project, run


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _images_text(text: str) -> str:
    """The text of the original entries: from the images list's "[" to the last entry's
    closing brace."""
    start = text.index('"images"')
    return text[start : text.rindex("}", 0, text.rindex("]")) + 1]


# ------------------------------------------------------------------ write-back


def test_write_back_appends_entries_as_the_contract_says(setup) -> None:
    project_file, run = setup
    old_bytes = project_file.read_bytes()
    old = json.loads(old_bytes)
    rows = {row["id"]: row for row in read_index(run)}

    result = write_run_to_project(project_file, run)

    assert result.run_name == "run-a"
    assert [t.tile_id for t in result.added] == ["t0001", "t0002", "t0003"]
    assert result.skipped == [("x0001", "not synthetic (extracted)")]
    assert "3 synthetic tile(s)" in result.summary()
    assert result.backup == project_file.with_name("project.qpproj.backup")
    assert result.backup.read_bytes() == old_bytes

    new_text = project_file.read_text(encoding="utf-8")
    new = json.loads(new_text)
    count = len(old["images"])
    for i in range(count):
        assert new["images"][i] == old["images"][i]
    assert _images_text(old_bytes.decode()) in new_text  # the very same bytes
    assert list(new) == list(old)
    for key in old:
        if key not in ("images", "lastID", "modifyTimestamp"):
            assert new[key] == old[key], key
    assert new["modifyTimestamp"] > old["modifyTimestamp"]
    ids = [e["entryID"] for e in new["images"]]
    assert ids == [*range(1, count + 1), count + 1, count + 2, count + 3]
    assert new["lastID"] == max(ids) == old["lastID"] + 3

    for written, item in zip(result.added, new["images"][count:], strict=True):
        row = rows[written.tile_id]
        tiff = run / "images" / f"{written.tile_id}.tif"
        assert list(item) == ENTRY_KEYS
        builder = item["serverBuilder"]
        assert list(builder) == ["builderType", "providerClassName", "uri", "args", "metadata"]
        assert builder["builderType"] == "uri"
        assert builder["providerClassName"] == BIOFORMATS_BUILDER
        assert builder["uri"] == path_to_uri(tiff) and builder["uri"].startswith("file:/")
        assert builder["args"] == ["--series", "0"]
        meta = builder["metadata"]
        assert (meta["width"], meta["height"]) == (TILE, TILE)
        assert meta["pixelType"] == "UINT8" and meta["isRGB"] is True
        assert meta["pixelCalibration"]["pixelWidth"] == {"value": float(row["mpp"]), "unit": "µm"}
        assert meta["levels"][0] == {"downsample": 1.0, "width": TILE, "height": TILE}
        assert item["entryID"] == written.entry_id
        assert uuid.UUID(item["randomizedName"]).version == 4
        assert item["imageName"] == f"synthetic-run-a-{written.tile_id}" == written.image_name
        assert "\n" not in item["description"]
        assert row["synthesis_type"] in item["description"]
        assert repr(row["class_name"]) in item["description"]
        assert f"seed {row['seed']}" in item["description"]
        assert item["metadata"] == {
            "histosynth.synthetic": "true",
            "histosynth.run": "run-a",
            "histosynth.id": written.tile_id,
            "histosynth.synthesis_type": row["synthesis_type"],
            "histosynth.source_entry_id": "1",
            "review_status": "pending",
        }
        assert item["tags"] == ["histosynth", "synthetic"]

    # QuPath-style text: 2-space indentation, no trailing spaces
    assert '\n    {\n      "serverBuilder": {\n        "builderType": "uri",' in new_text
    assert not re.search(r"[ \t]\n", new_text)

    reread = QuPathProject(project_file, use_paquo=False)
    assert len(reread) == count + 3
    assert reread.last_id == count + 3
    for written in result.added:
        entry = reread.entry(written.entry_id)
        assert entry.exists and entry.image_path == run / "images" / f"{written.tile_id}.tif"
        assert entry.tags == ["histosynth", "synthetic"]
        assert reread.synthetic_entry("run-a", written.tile_id) is not None
    assert reread.unknown_sidecars() == []

    mapping = json.loads((run / MAPPING_NAME).read_text())
    record = mapping["projects"][str(project_file)]
    assert record["run_name"] == "run-a"
    assert record["entries"] == {t.tile_id: t.entry_id for t in result.added}


def test_tiffs_open_in_tiatoolbox_with_the_rows_pixel_size_and_pixels(setup) -> None:
    from tiatoolbox.wsicore.wsireader import TIFFWSIReader, WSIReader

    project_file, run = setup
    result = write_run_to_project(project_file, run)
    rows = {row["id"]: row for row in read_index(run)}
    for written in result.added:
        row = rows[written.tile_id]
        reader = WSIReader.open(written.image)
        assert isinstance(reader, TIFFWSIReader)
        mpp = float(row["mpp"])
        assert np.allclose(reader.info.mpp, [mpp, mpp])
        assert tuple(reader.info.slide_dimensions) == (TILE, TILE)
        png = cv2.cvtColor(cv2.imread(str(run / row["image_path"])), cv2.COLOR_BGR2RGB)
        pixels = reader.read_rect((0, 0), (TILE, TILE), resolution=0, units="level")
        assert np.array_equal(pixels, png)
        at_mpp = reader.read_bounds((0, 0, TILE, TILE), resolution=mpp, units="mpp")
        assert np.array_equal(at_mpp, png)


def test_sidecars_hold_the_tiles_annotations(setup) -> None:
    project_file, run = setup
    result = write_run_to_project(project_file, run)
    project = QuPathProject(project_file, use_paquo=False)
    for written in result.added:
        assert written.sidecar == project.folder / "annotations" / f"{written.entry_id}.geojson"
        expected = read_annotations(run / "annotations" / f"{written.tile_id}.geojson")
        found = project.annotations(written.entry_id)
        assert [a.id for a in found] == [a.id for a in expected]
        for a, b in zip(found, expected, strict=True):
            assert a.geometry.equals(b.geometry) and a.class_name == b.class_name


def test_a_second_write_back_adds_nothing(setup) -> None:
    project_file, run = setup
    first = write_run_to_project(project_file, run)
    after_first = project_file.read_bytes()
    backup = project_file.with_name("project.qpproj.backup").read_bytes()

    second = write_run_to_project(project_file, run)

    assert second.added == []
    assert [s[0] for s in second.skipped] == ["t0001", "t0002", "x0001", "t0003"]
    for tile_id, reason in second.skipped:
        if tile_id != "x0001":
            entry_id = next(t.entry_id for t in first.added if t.tile_id == tile_id)
            assert reason.startswith(f"already in the project (entry {entry_id} ")
    assert project_file.read_bytes() == after_first
    assert project_file.with_name("project.qpproj.backup").read_bytes() == backup
    assert second.backup is None


def test_another_run_name_adds_the_run_again(setup) -> None:
    project_file, run = setup
    write_run_to_project(project_file, run)
    again = write_run_to_project(project_file, run, run_name="second look")
    assert [t.image_name for t in again.added] == [
        "synthetic-second look-t0001",
        "synthetic-second look-t0002",
        "synthetic-second look-t0003",
    ]
    project = QuPathProject(project_file, use_paquo=False)
    assert len(project.synthetic_entries()) == 6
    assert len(project.synthetic_entries("second look")) == 3
    # the mapping remembers the name used for this project
    assert write_run_to_project(project_file, run).run_name == "second look"


def test_a_project_changed_on_disk_is_refused(setup) -> None:
    project_file, _ = setup
    project = QuPathProject(project_file, use_paquo=False)
    project.add_synthetic_entry(
        project_file.parent / "x.tif", run="r", tile_id="t", synthesis_type="inpainting",
        width=64, height=64, mpp=0.5,
    )
    changed = project_file.read_bytes().replace(b'"images"', b'"images" ')
    project_file.write_bytes(changed)  # as QuPath saving the project would
    with pytest.raises(InputError) as info:
        project.save()
    assert str(info.value).startswith(f"{project_file}: the project file changed on disk")
    assert "QuPath" in str(info.value)
    assert project_file.read_bytes() == changed
    assert not project_file.with_name("project.qpproj.backup").exists()


def test_a_touched_project_is_refused_too(setup) -> None:
    project_file, _ = setup
    project = QuPathProject(project_file, use_paquo=False)
    project.add_synthetic_entry(
        project_file.parent / "x.tif", run="r", tile_id="t", synthesis_type="variation",
        width=64, height=64, mpp=0.5,
    )
    st_ = project_file.stat()
    os.utime(project_file, ns=(st_.st_atime_ns, st_.st_mtime_ns + 5_000_000_000))
    assert project.changed_on_disk() == "its modification time changed"
    with pytest.raises(InputError, match="changed on disk"):
        project.save()


def test_save_twice_keeps_working(setup) -> None:
    project_file, _ = setup
    project = QuPathProject(project_file, use_paquo=False)
    for tile_id in ("a", "b"):
        project.add_synthetic_entry(
            project_file.parent / f"{tile_id}.tif", run="r", tile_id=tile_id,
            synthesis_type="inpainting", width=64, height=64, mpp=0.5,
        )
        assert project.save() is not None
    assert project.save() is None  # nothing queued
    reread = QuPathProject(project_file, use_paquo=False)
    assert [e.name for e in reread.synthetic_entries("r")] == ["synthetic-r-a", "synthetic-r-b"]
    with pytest.raises(InputError, match="already in the project"):
        project.add_synthetic_entry(
            project_file.parent / "a.tif", run="r", tile_id="a", synthesis_type="inpainting",
            width=64, height=64, mpp=0.5,
        )


_READ_ONLY_CHILD = """
import subprocess, sys
folder, run = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], check=True)
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.writeback import write_run_to_project
try:
    write_run_to_project(folder, run)
except InputError as exc:
    print("InputError:", exc)
"""


def _write_back_read_only(project_file: Path, run: Path) -> str:
    """Run the write-back with the project folder read-only; return the error line.

    A normal user: ``chmod 0o555``. Root (whom chmod does not stop): a read-only bind
    mount in a private user + mount namespace (``unshare -rm``), skipped where the
    kernel or container does not allow one.
    """
    if os.geteuid() != 0:
        os.chmod(project_file.parent, 0o555)
        try:
            with pytest.raises(InputError) as info:
                write_run_to_project(project_file, run)
        finally:
            os.chmod(project_file.parent, 0o755)
        return f"InputError: {info.value}"
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("root can write anywhere, and unshare is missing for a read-only mount")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("root can write anywhere, and no user namespace for a read-only mount: "
                    + probe.stderr.strip())
    done = subprocess.run(
        [unshare, "-rm", sys.executable, "-c", _READ_ONLY_CHILD, str(project_file.parent),
         str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_read_only_project_folder_is_refused_and_nothing_written(setup) -> None:
    project_file, run = setup
    before_run, before_project = _tree(run), _tree(project_file.parent)
    line = _write_back_read_only(project_file, run)
    assert line.startswith(
        f"InputError: {project_file.parent}: the QuPath project folder is read-only ("
    )
    assert line.endswith("); nothing was written")
    assert _tree(run) == before_run and _tree(project_file.parent) == before_project


def test_an_unusable_annotations_folder_is_refused_and_nothing_written(setup) -> None:
    project_file, run = setup
    annotations = project_file.parent / "annotations"
    shutil.rmtree(annotations)
    annotations.write_text("not a folder")
    before_run, before_project = _tree(run), _tree(project_file.parent)
    with pytest.raises(InputError) as info:
        write_run_to_project(project_file, run)
    assert str(info.value) == f"{annotations}: the project's annotations folder is not a folder"
    assert _tree(run) == before_run and _tree(project_file.parent) == before_project


def test_a_missing_tile_image_is_named_and_nothing_written(setup) -> None:
    project_file, run = setup
    missing = run / "images" / "t0002.png"
    missing.unlink()
    before_run, before_project = _tree(run), _tree(project_file.parent)
    with pytest.raises(InputError) as info:
        write_run_to_project(project_file, run)
    assert str(info.value) == (
        f"{run / 'index.csv'}: tile t0002: image_path 'images/t0002.png' is missing; nothing "
        "was written (resume the run to make the tile again)"
    )
    assert _tree(run) == before_run and _tree(project_file.parent) == before_project


def test_a_row_without_pixel_size_is_named(templates, tmp_path) -> None:
    project_file = build_demo_project(tmp_path / "p", slide=templates["slide"])
    run = tmp_path / "run"
    with RunWriter(run, config={}) as writer:
        writer.add_tile(
            TileRecord(id="nompp", synthesis_type="inpainting"),
            np.zeros((32, 32, 3), np.uint8),
            np.zeros((32, 32), np.uint8),
            [],
        )
    with pytest.raises(InputError, match=r"index\.csv: tile nompp: mpp '' is not a positive"):
        write_run_to_project(project_file, run)


def test_a_sidecar_of_a_missing_entry_is_never_overwritten(setup) -> None:
    project_file, run = setup
    project = QuPathProject(project_file, use_paquo=False)
    orphan = project.folder / "annotations" / f"{project.last_id + 2}.geojson"
    orphan.write_text('{"type": "FeatureCollection", "features": []}')
    assert project.unknown_sidecars() == [orphan]
    before_run, before_project = _tree(run), _tree(project_file.parent)
    with pytest.raises(InputError) as info:
        write_run_to_project(project_file, run)
    assert str(info.value).startswith(
        f"{orphan}: a GeoJSON file for entry id {project.last_id + 2} already exists"
    )
    assert _tree(run) == before_run and _tree(project_file.parent) == before_project


def test_unknown_sidecars_lists_files_of_no_entry(setup) -> None:
    project_file, _ = setup
    project = QuPathProject(project_file, use_paquo=False)
    folder = project.folder / "annotations"
    (folder / f"{project.entries[0].name}.geojson").write_text("{}")  # by image name: known
    (folder / "77.geojson").write_text("{}")
    (folder / "notes.txt").write_text("")
    assert project.unknown_sidecars() == [folder / "77.geojson"]


@pytest.mark.parametrize("version", ["v0.3.2", "v0.4.0", "v0.6.0-rc3"])
def test_write_back_into_real_qupath_projects(version, templates, tmp_path) -> None:
    source = _fixtures() / version
    assert (source / "project.qpproj").is_file(), source
    folder = tmp_path / version
    shutil.copytree(source, folder)
    run = tmp_path / "run-a"
    shutil.copytree(templates["run"], run)
    old_bytes = (folder / "project.qpproj").read_bytes()
    old = json.loads(old_bytes)
    old_project = QuPathProject(folder, use_paquo=False)
    assert old_project.missing_images()  # their images are on the authors' machines

    result = write_run_to_project(folder, run)

    new_text = (folder / "project.qpproj").read_text(encoding="utf-8")
    new = json.loads(new_text)
    count = len(old["images"])
    assert all(new["images"][i] == old["images"][i] for i in range(count))
    assert _images_text(old_bytes.decode()) in new_text
    assert {k: v for k, v in new.items() if k not in ("images", "lastID", "modifyTimestamp")} == {
        k: v for k, v in old.items() if k not in ("images", "lastID", "modifyTimestamp")
    }
    assert new["lastID"] == old["lastID"] + 3
    assert [t.entry_id for t in result.added] == [old["lastID"] + 1 + i for i in range(3)]
    assert not new_text.endswith("\n")  # like QuPath's file
    reread = QuPathProject(folder, use_paquo=False)
    assert [e.entry_id for e in reread.entries[:count]] == [e.entry_id for e in old_project]
    assert len(reread.synthetic_entries("run-a")) == 3
    assert all(e.exists for e in reread.synthetic_entries())
    for written in result.added:
        assert reread.annotations(written.entry_id)  # the sidecar is found


# ------------------------------------------------------------------ JSON text


def _project_doc(images: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "0.5.1",
        "createTimestamp": 1,
        "modifyTimestamp": 2,
        "uri": "file:/p/project.qpproj",
        "lastID": len(images),
        "images": images,
    }


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_entry = st.fixed_dictionaries(
    {
        "serverBuilder": st.fixed_dictionaries({"builderType": st.just("uri"), "uri": _names}),
        "entryID": st.integers(1, 10**6),
        "imageName": _names,
        "metadata": st.dictionaries(_names, _names, max_size=3),
    }
)


@settings(max_examples=150, deadline=None)
@given(
    old=st.lists(_entry, max_size=3),
    added=st.lists(_entry, min_size=1, max_size=3),
    indent=st.sampled_from([None, 2, 4, "\t"]),
    crlf=st.booleans(),
)
def test_appending_keeps_every_other_character(old, added, indent, crlf) -> None:
    text = json.dumps(_project_doc(old), indent=indent, ensure_ascii=False)
    if crlf:
        text = text.replace("\n", "\r\n")
    new_text = append_entries_text(text, added, 99, 12345)
    new = json.loads(new_text)
    assert new["images"] == old + added
    assert new["lastID"] == 99 and new["modifyTimestamp"] == 12345
    assert new["uri"] == "file:/p/project.qpproj" and new["createTimestamp"] == 1
    if old:  # the old entries' text is kept
        assert _images_text(text) in new_text
    if indent is None:
        assert "\n" not in new_text
    elif crlf:
        assert "\n" not in new_text.replace("\r\n", "")
    if indent == 4:  # entries at 8 spaces, their keys at 12, old and new alike
        unix = new_text.replace("\r\n", "\n")
        assert unix.count('\n' + 12 * " " + '"entryID"') == len(old) + len(added)


def test_appending_escapes_like_gson_and_fills_missing_keys() -> None:
    text = '{\n  "version": "0.2.0",\n  "images": []\n}'
    entry = {"imageName": "a<b>&c='d'", "metadata": {}, "tags": []}
    new_text = append_entries_text(text, [entry], 7, 42)
    assert "a\\u003cb\\u003e\\u0026c\\u003d\\u0027d\\u0027" in new_text
    assert '"metadata": {},' in new_text and '"tags": []' in new_text
    new = json.loads(new_text)
    assert new["images"] == [entry]
    assert new["lastID"] == 7 and new["modifyTimestamp"] == 42 and new["createTimestamp"] == 42
    assert list(new) == ["version", "createTimestamp", "modifyTimestamp", "lastID", "images"]
    with pytest.raises(ValueError, match="no 'images'"):
        append_entries_text('{"version": "0.5.1"}', [entry], 1, 1)


# ------------------------------------------------------------------ review sync


def _set_metadata(project_file: Path, changes: dict[int, dict[str, str]]) -> None:
    """Edit entries' metadata as a reviewer in QuPath would (QuPath rewrites the file)."""
    doc = json.loads(project_file.read_text(encoding="utf-8"))
    for item in doc["images"]:
        item["metadata"].update(changes.get(item["entryID"], {}))
    project_file.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")


def test_review_sync_copies_decisions_into_the_index(setup) -> None:
    project_file, run = setup
    result = write_run_to_project(project_file, run)
    e1, e2, _ = (t.entry_id for t in result.added)
    _set_metadata(project_file, {e1: {"review_status": "accepted"},
                                 e2: {"review_status": " Rejected "}})
    doc = json.loads(project_file.read_text(encoding="utf-8"))
    doc["images"].append(  # an entry of another run, with a status unknown to us: ignored
        {
            "serverBuilder": {"builderType": "uri", "uri": "file:/elsewhere/t0001.tif"},
            "entryID": 500,
            "imageName": "synthetic-other-t0001",
            "metadata": {"histosynth.run": "other", "histosynth.id": "t0001",
                         "review_status": "maybe"},
        }
    )
    project_file.write_text(json.dumps(doc, indent=2), encoding="utf-8")

    synced = review_sync(project_file, run)

    assert synced.counts == {"pending": 1, "accepted": 1, "rejected": 1}
    assert synced.changed == 2
    assert synced.statuses == {"t0001": "accepted", "t0002": "rejected", "t0003": "pending"}
    assert synced.not_in_project == [] and synced.not_in_index == []
    statuses = {row["id"]: row["review_status"] for row in read_index(run)}
    assert statuses == {"t0001": "accepted", "t0002": "rejected", "x0001": "pending",
                        "t0003": "pending"}
    assert "1 accepted" in synced.summary()
    assert review_sync(project_file, run).changed == 0


def test_review_sync_names_an_entry_with_an_unknown_status(setup) -> None:
    project_file, run = setup
    result = write_run_to_project(project_file, run)
    entry_id = result.added[1].entry_id
    _set_metadata(project_file, {result.added[0].entry_id: {"review_status": "accepted"},
                                 entry_id: {"review_status": "looks fine"}})
    index_before = (run / "index.csv").read_bytes()
    with pytest.raises(InputError) as info:
        review_sync(project_file, run)
    assert str(info.value) == (
        f"{project_file}: entry {entry_id} 'synthetic-run-a-t0002': review_status "
        "'looks fine' is not one of pending, accepted, rejected"
    )
    assert (run / "index.csv").read_bytes() == index_before


def test_review_sync_reports_tiles_missing_on_either_side(setup) -> None:
    project_file, run = setup
    result = write_run_to_project(project_file, run)
    doc = json.loads(project_file.read_text(encoding="utf-8"))
    doc["images"] = [e for e in doc["images"] if e["entryID"] != result.added[2].entry_id]
    doc["images"][-1]["metadata"]["histosynth.id"] = "gone"
    project_file.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    synced = review_sync(project_file, run)
    assert synced.not_in_project == ["t0002", "t0003"]
    assert synced.not_in_index == [f"entry {result.added[1].entry_id} 'synthetic-run-a-t0002'"]


# ------------------------------------------------------------------ paquo


def test_paquo_write_without_qupath_is_one_clear_line(setup, tmp_path, monkeypatch) -> None:
    project_file, run = setup
    empty = tmp_path / "not-qupath"
    empty.mkdir()
    monkeypatch.setenv("PAQUO_QUPATH_DIR", str(empty))
    before = _tree(run), _tree(project_file.parent)
    with pytest.raises(InputError) as info:
        write_run_with_paquo(project_file, run)
    message = str(info.value)
    assert message.startswith(
        f"{project_file}: cannot write the project through paquo: no valid QuPath installation"
    )
    assert "PAQUO_QUPATH_DIR" in message and "\n" not in message
    assert (_tree(run), _tree(project_file.parent)) == before


def test_paquo_write_with_qupath(setup) -> None:
    available, reason = qupath_available()
    if not available:
        pytest.skip(reason)
    project_file, run = setup
    result = write_run_with_paquo(project_file, run)
    assert [t.tile_id for t in result.added] == ["t0001", "t0002", "t0003"]
    project = QuPathProject(project_file)
    for written in result.added:
        entry = project.entry(written.entry_id)
        assert entry.metadata["histosynth.id"] == written.tile_id
        assert entry.metadata["review_status"] == "pending"
        assert project.annotations(entry)
    again = write_run_with_paquo(project_file, run)
    assert again.added == []


# ------------------------------------------------------------------ the project lock

_HOLD = """
import sys, time
from histosynth.integration.locks import project_lock
with project_lock(sys.argv[1], purpose="holder under test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(project_file: Path, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(project_file), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_refuses_with_one_line_and_touches_nothing(setup, caplog) -> None:
    """While another process holds the lock, write-back refuses (naming the holder) and
    leaves the project and its annotations folder as they were; once the holder is
    SIGKILLed the OS drops its lock and the next writer takes it over at once."""
    from histosynth.integration.locks import ProjectLockedError, project_lock

    project_file, run = setup
    before = _tree(project_file.parent)
    child = _holder(project_file, 60)
    try:
        with pytest.raises(ProjectLockedError) as err:
            write_run_to_project(project_file, run)
        message = str(err.value)
        assert f"process {child.pid}" in message and "holder under test" in message
        assert "--wait" in message and "\n" not in message
        with (
            pytest.raises(ProjectLockedError, match=r"after waiting 0\.3 s"),
            project_lock(project_file, wait_s=0.3),
        ):
            pass
        after = _tree(project_file.parent)
        after.pop(".histosynth-project.lock", None)
        before.pop(".histosynth-project.lock", None)
        assert after == before
    finally:
        child.kill()  # SIGKILL: no cleanup in the holder
        child.wait()
    with caplog.at_level("INFO", logger="histosynth"):
        result = write_run_to_project(project_file, run)
    assert len(result.added) == 3
    assert any("took over the lock" in r.message and str(child.pid) in r.message
               for r in caplog.records)


def test_a_writer_waits_for_the_lock_with_wait(setup) -> None:
    project_file, run = setup
    child = _holder(project_file, 1.0)
    try:
        result = write_run_to_project(project_file, run, wait_s=30)
    finally:
        child.wait(timeout=30)
    assert len(result.added) == 3


def test_the_lock_is_reentrant_and_a_nested_hold_releases_nothing(setup) -> None:
    from histosynth.integration.locks import project_lock

    project_file, _ = setup
    probe = [sys.executable, "-c", _HOLD, str(project_file), "0"]
    with project_lock(project_file):
        with project_lock(project_file):
            pass
        # still held by this process: another process cannot take it
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "ProjectLockedError" in done.stderr
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "held" in done.stdout


_WRITE = """
import sys, time
from pathlib import Path
from histosynth.integration.qupath.writeback import write_run_to_project
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
result = write_run_to_project(sys.argv[1], sys.argv[2], wait_s=120)
print(len(result.added))
"""


@pytest.mark.parametrize("trial", range(3))
def test_two_concurrent_write_backs_keep_both_runs_entries_and_sidecars(
    templates, tmp_path, trial
) -> None:
    """Two processes write two runs into one project at the same moment: one waits for
    the other, and every entry of both ends in the project with its own sidecar."""
    project_file = build_demo_project(tmp_path / "project", slide=templates["slide"])
    count = len(json.loads(project_file.read_text())["images"])
    runs = []
    for name in ("run-a", "run-b"):
        shutil.copytree(templates["run"], tmp_path / name)
        runs.append(tmp_path / name)
    go = tmp_path / "go"
    children = [
        subprocess.Popen([sys.executable, "-c", _WRITE, str(project_file), str(run), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for run in runs
    ]
    go.touch()
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["3", "3"]
    images = json.loads(project_file.read_text())["images"]
    assert len(images) == count + 6
    by_run: dict[str, set[str]] = {}
    for image in images[count:]:
        meta = image["metadata"]
        by_run.setdefault(meta["histosynth.run"], set()).add(meta["histosynth.id"])
        sidecar = project_file.parent / "annotations" / f"{image['entryID']}.geojson"
        assert sidecar.is_file()
        tile = next(
            (r for r in read_index(tmp_path / meta["histosynth.run"])
             if r["id"] == meta["histosynth.id"]), None)
        assert tile is not None
        written = read_annotations(sidecar)
        assert written and all(a.class_name.startswith("Vessel") for a in written)
    assert by_run == {"run-a": {"t0001", "t0002", "t0003"}, "run-b": {"t0001", "t0002", "t0003"}}


# ------------------------------------------------------------------ SIGKILL at every rename

_KILL_AT = """
import os, signal, sys
import histosynth.common.files as atomic
from histosynth.integration.qupath.writeback import write_run_to_project
calls = [0]
real = os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
atomic.os.replace = replace
write_run_to_project(sys.argv[1], sys.argv[2])
print("finished after", calls[0], "renames")
"""


def _state(project_file: Path) -> dict[str, Any]:
    """What a write-back leaves: the new entries (run, tile, entry id, sidecar bytes),
    the stray files of the annotations folder and the project folder's hidden files."""
    images = json.loads(project_file.read_text())["images"]
    entries = sorted(
        (
            image["metadata"].get("histosynth.run"),
            image["metadata"].get("histosynth.id"),
            image["entryID"],
            (project_file.parent / "annotations" / f"{image['entryID']}.geojson").read_bytes(),
        )
        for image in images
        if "histosynth.run" in image.get("metadata", {})
    )
    known = {f"{image['entryID']}.geojson" for image in images}
    stray = sorted(p.name for p in (project_file.parent / "annotations").iterdir()
                   if p.name not in known)
    hidden = sorted(p.name for p in project_file.parent.iterdir() if p.name.startswith("."))
    return {"entries": entries, "stray": stray, "hidden": hidden}


def test_a_write_back_killed_at_any_rename_resumes_to_the_uninterrupted_result(
    templates, tmp_path
) -> None:
    """SIGKILL at the 1st, 2nd, … atomic rename of a write-back; then a plain write-back
    again. Each ends exactly where an uninterrupted write-back ends: the same entries
    with the same ids and sidecars, no stray sidecar, no temporary file, no journal."""
    def fresh(name: str) -> tuple[Path, Path]:
        project = build_demo_project(tmp_path / name / "project", slide=templates["slide"])
        run = tmp_path / name / "run-a"
        shutil.copytree(templates["run"], run)
        return project, run

    project, run = fresh("reference")
    write_run_to_project(project, run)
    reference = _state(project)
    assert len(reference["entries"]) == 3 and not reference["stray"]
    kills = 0
    for n in range(1, 40):
        project, run = fresh(f"kill-{n}")
        done = subprocess.run(
            [sys.executable, "-c", _KILL_AT, str(project), str(run), str(n)],
            capture_output=True, text=True, timeout=120,
        )
        if done.returncode == 0:
            assert "finished after" in done.stdout
            break
        assert done.returncode == -9, done.stderr  # killed, not failed
        kills += 1
        write_run_to_project(project, run)  # the resume
        assert _state(project) == reference, f"killed at rename {n}"
    else:
        pytest.fail("the write-back never finished")
    print(f"\n{kills} kills, each resumed to the reference")
    assert kills >= 6  # TIFFs, journal, sidecars, project and backup, mapping


@pytest.mark.parametrize("how", ["replaced", "outside", "status"])
def test_write_back_refuses_a_spoiled_row_and_writes_nothing(setup, how) -> None:
    """Write-back checks every row it would import: a replaced image (SHA-256), an image
    outside the run, an unknown review status — one line naming the tile, nothing
    written into the project."""
    project_file, run = setup
    index = run / "index.csv"
    text = index.read_text(encoding="utf-8")
    if how == "replaced":
        (run / "images" / "t0002.png").write_bytes((run / "images" / "t0001.png").read_bytes())
    elif how == "outside":
        shutil.copy(run / "images" / "t0002.png", run.parent / "elsewhere.png")
        index.write_text(text.replace("images/t0002.png", "../elsewhere.png"), encoding="utf-8")
    else:
        import csv
        import io

        rows = read_index(run)
        next(r for r in rows if r["id"] == "t0002")["review_status"] = "maybe"
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(list(rows[0]))
        writer.writerows(list(r.values()) for r in rows)
        index.write_bytes(buffer.getvalue().encode("utf-8"))
    before = _tree(project_file.parent)
    with pytest.raises(InputError) as err:
        write_run_to_project(project_file, run)
    message = str(err.value)
    assert "tile t0002" in message and "nothing was written" in message
    assert {"replaced": "SHA-256", "outside": "outside the run", "status": "maybe"}[how] in message
    assert _tree(project_file.parent) == before


_HOLD_RUN_FOLDER = """
import sys, time
from pathlib import Path
from histosynth.integration.locks import RUN_LOCK_NAME, folder_lock
with folder_lock(Path(sys.argv[1]), RUN_LOCK_NAME, "the run folder", "the run folder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_review_sync_refuses_while_the_run_folder_is_being_written(setup) -> None:
    """Review sync rewrites RUN/index.csv: while a writer holds the run folder (a resumed
    synthesis), it refuses with one line and leaves the index as it was."""
    from histosynth.integration.locks import ProjectLockedError

    project_file, run = setup
    write_run_to_project(project_file, run)
    index_before = (run / "index.csv").read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _HOLD_RUN_FOLDER, str(run)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ProjectLockedError, match="the run folder is being written"):
            review_sync(project_file, run)
        assert (run / "index.csv").read_bytes() == index_before
    finally:
        child.kill()
        child.wait()
    assert review_sync(project_file, run).counts["pending"] == 3


def test_a_symlinked_project_file_stays_a_link_after_write_back(setup, tmp_path) -> None:
    """A lab keeps project.qpproj on another volume and links it into the project folder:
    write-back updates the linked file and the link stays a link."""
    project_file, run = setup
    elsewhere = tmp_path / "elsewhere" / "project.qpproj"
    elsewhere.parent.mkdir()
    shutil.move(project_file, elsewhere)
    project_file.symlink_to(elsewhere)
    result = write_run_to_project(project_file, run)
    assert len(result.added) == 3
    assert project_file.is_symlink() and project_file.resolve() == elsewhere.resolve()
    assert len(json.loads(elsewhere.read_text())["images"]) >= 3
    assert not list(elsewhere.parent.glob(".*.tmp"))
