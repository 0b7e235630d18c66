"""Reading QuPath projects: real QuPath-written fixtures, and projects built here whose
images exist (moved projects, awkward file names), bad input, annotation sources."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import cv2
import numpy as np
import pytest

from histosynth.integration.errors import InputError
from histosynth.integration.qupath import ProjectEntry, QuPathProject
from histosynth.integration.qupath.uris import path_to_uri

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX layout of the test projects")


def _fixtures_folder() -> Path:
    """``tests/fixtures/qupath``: project files written by real QuPath versions."""
    return Path(__file__).resolve().parents[1] / "fixtures" / "qupath"


def _fixture(version: str) -> Path:
    return _fixtures_folder() / version


def _rgb_of_java_int(value: int) -> tuple[int, int, int]:
    """Independent unpacking: the int's big-endian bytes are A, R, G, B."""
    _, r, g, b = struct.pack(">i", value)
    return (r, g, b)


# ------------------------------------------------------------------ fixtures

EXPECTED = {
    "v0.3.2": {
        "version": "0.3.2",
        "last_id": 459,
        "ids": [1, 2, 3, 4],
        "first_name": "TCGA-D5-5539-01Z-00-DX1.9c46fe78-2adb-4f49-9141-cda135c2c90b.svs",
        "provider": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
        "args": [],
        "windows": True,
        "old_folder": PureWindowsPath("D:/QuPath COAD Project (Annotated)"),
    },
    "v0.4.0": {
        "version": "0.4.0",
        "last_id": 285,
        "ids": [242, 243, 244, 245],
        "first_name": "381_P14_C1ql1-570_Cbln1-633_GFP-520_n2_1_w4CSU-6420000.tif",
        "provider": "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder",
        "args": ["--series", "0"],
        "windows": False,
        "old_folder": PurePosixPath("/home/phm/Developpement/QuPath_Projects/Foci"),
    },
    "v0.6.0-rc3": {
        "version": "0.6.0-rc3",
        "last_id": 107,
        "ids": [1, 2, 3, 4],
        "first_name": "kontrol15.01.25_14_6_134952.svs",
        "provider": "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder",
        "args": ["--series", "0"],
        "windows": True,
        "old_folder": PureWindowsPath("D:/DigitalPathologyDrafts/metadata-qupath"),
    },
}


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_fixture_entries(version: str) -> None:
    expected = EXPECTED[version]
    folder = _fixture(version)
    project = QuPathProject(folder)
    raw = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    assert project.file == folder / "project.qpproj"
    assert project.folder == folder
    assert project.version == expected["version"]
    assert project.uri == raw["uri"]
    assert project.last_id == expected["last_id"]
    assert PureWindowsPath(project.old_folder) == PureWindowsPath(expected["old_folder"])
    assert len(project) == 4
    assert [e.entry_id for e in project.entries] == expected["ids"]
    assert project.entries[0].name == expected["first_name"]
    for entry, raw_entry in zip(project.entries, raw["images"], strict=True):
        assert isinstance(entry, ProjectEntry)
        assert entry.raw == raw_entry  # untouched
        assert entry.name == raw_entry["imageName"]
        assert entry.randomized_name == raw_entry["randomizedName"]
        assert entry.metadata == {}
        assert entry.tags == []
        assert entry.description is None
        assert entry.uri == raw_entry["serverBuilder"]["uri"]
        assert entry.builder_type == "uri"
        assert entry.provider == expected["provider"]
        assert entry.args == expected["args"]
        assert entry.server_metadata["name"] == raw_entry["serverBuilder"]["metadata"]["name"]
        assert entry.stored_path is not None
        assert entry.stored_path.name == raw_entry["serverBuilder"]["metadata"]["name"]
        assert isinstance(entry.stored_path, PureWindowsPath) == expected["windows"]
        assert not entry.exists
        assert entry.image_path is None


def test_fixture_windows_uris_parse_to_drive_paths() -> None:
    project = QuPathProject(_fixture("v0.3.2") / "project.qpproj")
    path = project.entry(1).stored_path
    assert isinstance(path, PureWindowsPath)
    assert path.drive == "I:"
    assert path.parts[1:3] == ("COAD-TCGA-Diagnostic-Slide", "00d69f69-3120-4b0c-8985-aab4edf9bc4b")


def test_fixture_non_ascii_uris_are_decoded() -> None:
    project = QuPathProject(_fixture("v0.6.0-rc3"))
    assert project.entry(2).stored_path == PureWindowsPath(
        "E:/KONTROLHE_2025/\u015eUBAT19.02.25_HE_0/kontrol19.02.2025_11_1_SS45328_041327.svs"
    )
    assert project.entry(4).stored_path.parent.name == "\u015eUBAT20.02.25_HE_0"
    assert project.entry(1).stored_path.parent.name == "OCAK15.01.25_HE_0"


@pytest.mark.parametrize("version", ["v0.4.0", "v0.6.0-rc3"])
def test_fixture_classes_have_exact_colours(version: str) -> None:
    folder = _fixture(version)
    stored = json.loads((folder / "classifiers" / "classes.json").read_text())["pathClasses"]
    classes = QuPathProject(folder).classes
    assert list(classes) == [c["name"] for c in stored]
    for item in stored:
        assert classes[item["name"]] == _rgb_of_java_int(item["color"])
    assert classes["Tumor"] == (200, 0, 0)  # -3670016 = 0xFFC80000
    assert classes["Stroma"] == (150, 200, 150)
    assert classes["Region*"] == (0, 0, 180)


def test_fixture_without_classes_file_has_no_classes() -> None:
    assert QuPathProject(_fixture("v0.3.2")).classes == {}


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_fixture_missing_images_report_names_every_image(version: str) -> None:
    project = QuPathProject(_fixture(version))
    missing = project.missing_images()
    assert [e.entry_id for e in missing] == EXPECTED[version]["ids"]
    report = project.missing_images_report()
    assert f"4 of 4 images of {project.file}" in report
    for entry in missing:
        assert f"entry {entry.entry_id} '{entry.name}'" in report
        assert entry.uri in report
        for tried in entry.tried_paths:
            assert f"tried {tried}" in report


def test_fixture_moved_linux_project_tries_the_relative_location() -> None:
    project = QuPathProject(_fixture("v0.4.0"))
    entry = project.entry(242)
    # /home/phm/Developpement/QuPath_Projects/Foci -> ../../../Images/TrainingFoci/...
    relative = Path(*["Images", "TrainingFoci", "RNA", "Images"], entry.name)
    assert entry.tried_paths == [
        Path("/home/phm/Images/TrainingFoci/RNA/Images") / entry.name,
        project.folder.parent.parent.parent / relative,
    ]
    assert str(project.folder.parent.parent.parent / relative) in project.missing_images_report()


def test_fixture_windows_project_says_why_it_cannot_relocate() -> None:
    report = QuPathProject(_fixture("v0.3.2")).missing_images_report()
    assert "Windows path" in report
    assert "not on the drive" in report  # images on I:, project on D:


# ------------------------------------------------------------------ entry lookup


def test_entry_lookup_by_id_name_and_digit_string() -> None:
    project = QuPathProject(_fixture("v0.4.0"))
    first = project.entries[0]
    assert project.entry(242) is first
    assert project.entry("242") is first
    assert project.entry(first.name) is first
    assert project.entry(first) is first
    with pytest.raises(InputError, match="no entry with this id"):
        project.entry(1)
    with pytest.raises(InputError, match="no entry with this name"):
        project.entry("nope.tif")


# ------------------------------------------------------------------ projects built here


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((8, 12, 3), value, dtype=np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def _entry(entry_id: int, uri: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "serverBuilder": {
            "builderType": "uri",
            "providerClassName": "qupath.lib.images.servers.ImageIoServerBuilder",
            "uri": uri,
            "args": [],
            "metadata": {"name": name, "width": 12, "height": 8},
        },
        "entryID": entry_id,
        "randomizedName": f"00000000-0000-4000-8000-{entry_id:012d}",
        "imageName": name,
        "metadata": {},
        **extra,
    }


def _project(folder: Path, images: list[dict[str, Any]], **top: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "version": "0.5.1",
        "createTimestamp": 1700000000000,
        "modifyTimestamp": 1700000000000,
        "uri": path_to_uri(folder / "project.qpproj"),
        "lastID": max([e.get("entryID", 0) for e in images if isinstance(e, dict)] + [0]),
        "images": images,
    }
    data.update(top)
    file = folder / "project.qpproj"
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return file


AWKWARD = ["plain.png", "with space.png", "per%cent #hash.png", "\u015eUBAT \u00e9t\u00e9.png"]


@posix_only
def test_images_in_place_are_found(tmp_path: Path) -> None:
    images = [_png(tmp_path / "slides" / name) for name in AWKWARD]
    _project(
        tmp_path / "proj",
        [_entry(i + 1, path_to_uri(p), p.name) for i, p in enumerate(images)],
    )
    project = QuPathProject(tmp_path / "proj" / "project.qpproj")
    assert [e.image_path for e in project.entries] == images
    assert all(e.exists and not e.relocated for e in project.entries)
    assert project.missing_images() == []
    assert project.missing_images_report() == ""
    uri = project.entry(4).uri
    assert "%C5%9EUBAT%20%C3%A9t%C3%A9.png" in uri  # Java-style encoding on disk
    assert project.entry("\u015eUBAT \u00e9t\u00e9.png").entry_id == 4


@posix_only
def test_moved_project_finds_images_relative_to_its_old_folder(tmp_path: Path) -> None:
    old_root = Path("/nonexistent-histosynth/old machine/study")
    entries = [
        _entry(i + 1, path_to_uri(old_root / "slides" / "batch 1" / n), n)
        for i, n in enumerate(AWKWARD)
    ]
    entries.append(_entry(9, path_to_uri(old_root / "project" / "inside" / "own.png"), "own.png"))
    # written on the old machine, then copied (project + slides) to tmp_path
    _project(
        tmp_path / "study" / "project",
        entries,
        uri=path_to_uri(old_root / "project" / "project.qpproj"),
    )
    found = [_png(tmp_path / "study" / "slides" / "batch 1" / n) for n in AWKWARD]
    own = _png(tmp_path / "study" / "project" / "inside" / "own.png")

    project = QuPathProject(tmp_path / "study" / "project")
    assert project.old_folder == old_root / "project"
    assert [e.image_path for e in project.entries] == [*found, own]
    for entry in project.entries:
        assert entry.relocated
        assert entry.tried_paths[0] == entry.stored_path
        assert entry.tried_paths[-1] == entry.image_path
    assert project.missing_images() == []


@posix_only
def test_windows_project_copied_to_linux_finds_images_on_the_same_drive(tmp_path: Path) -> None:
    entries = [
        _entry(1, "file:/D:/Lab/slides/%C5%9EUBAT/a%20b.png", "a b.png"),
        _entry(2, "file:/E:/elsewhere/c.png", "c.png"),
    ]
    _project(
        tmp_path / "Lab" / "projects" / "p1", entries, uri="file:/D:/Lab/projects/p1/project.qpproj"
    )
    image = _png(tmp_path / "Lab" / "slides" / "\u015eUBAT" / "a b.png")
    project = QuPathProject(tmp_path / "Lab" / "projects" / "p1")
    assert project.entry(1).image_path == image
    assert project.entry(1).stored_path == PureWindowsPath("D:/Lab/slides/\u015eUBAT/a b.png")
    assert [e.entry_id for e in project.missing_images()] == [2]
    report = project.missing_images_report()
    assert "1 of 2 images" in report
    assert "entry 2 'c.png': file:/E:/elsewhere/c.png" in report
    assert "tried E:\\elsewhere\\c.png" in report


@posix_only
def test_missing_image_report_lists_every_path_tried(tmp_path: Path) -> None:
    _project(
        tmp_path / "new" / "proj",
        [_entry(5, "file:/old/place/images/gone%20away.png", "gone away.png")],
        uri="file:/old/place/proj/project.qpproj",
    )
    project = QuPathProject(tmp_path / "new" / "proj")
    entry = project.entry(5)
    assert entry.tried_paths == [
        Path("/old/place/images/gone away.png"),
        tmp_path / "new" / "images" / "gone away.png",
    ]
    report = project.missing_images_report()
    assert "entry 5 'gone away.png': file:/old/place/images/gone%20away.png" in report
    assert "tried /old/place/images/gone away.png" in report
    assert f"tried {tmp_path / 'new' / 'images' / 'gone away.png'}" in report


@posix_only
def test_nested_and_combined_server_builders(tmp_path: Path) -> None:
    image = _png(tmp_path / "img" / "r.png")
    inner = {
        "builderType": "uri",
        "providerClassName": "x.Inner",
        "uri": path_to_uri(image),
        "args": ["--series", "2"],
    }
    rotated = {
        "serverBuilder": {"builderType": "rotated", "builder": inner, "rotation": "ROTATE_90"},
        "entryID": 1,
        "imageName": "rotated",
    }
    pyramid = {
        "serverBuilder": {
            "builderType": "pyramidize",
            "builder": {"builderType": "rotated", "builder": inner, "rotation": "ROTATE_180"},
        },
        "entryID": 2,
        "imageName": "pyramid",
    }
    sparse = {
        "serverBuilder": {
            "builderType": "sparse",
            "path": "x",
            "regions": [
                {"region": {"x": 0}, "builder": {"builderType": "uri", "uri": "file:/a/1.png"}},
                {"region": {"x": 9}, "builder": {"builderType": "uri", "uri": "file:/a/2.png"}},
            ],
        },
        "entryID": 3,
        "imageName": "sparse",
    }
    remote = _entry(4, "https://omero.example.org/webclient/?show=image-1", "remote")
    _project(tmp_path / "proj", [rotated, pyramid, sparse, remote])
    project = QuPathProject(tmp_path / "proj")
    for entry_id in (1, 2):
        entry = project.entry(entry_id)
        assert entry.uri == path_to_uri(image)
        assert entry.provider == "x.Inner"
        assert entry.args == ["--series", "2"]
        assert entry.image_path == image
    assert project.entry(1).builder_type == "rotated"
    assert project.entry(2).builder_type == "pyramidize"
    combined = project.entry(3)
    assert combined.uri is None
    assert combined.uris == ["file:/a/1.png", "file:/a/2.png"]
    assert [e.entry_id for e in project.missing_images()] == [3, 4]
    report = project.missing_images_report()
    assert "combines 2 images" in report
    assert "not a local file URI" in report


def test_entry_fields_metadata_tags_description_and_last_id(tmp_path: Path) -> None:
    entry = _entry(
        7,
        "file:/x/a.png",
        "a.png",
        description="first slide",
        metadata={"review_status": "pending", "n": 3},
        tags=["histosynth", "synthetic"],
    )
    file = _project(tmp_path / "p", [entry], lastID=3)
    project = QuPathProject(file)
    read = project.entry(7)
    assert read.description == "first slide"
    assert read.metadata == {"review_status": "pending", "n": "3"}
    assert read.tags == ["histosynth", "synthetic"]
    assert project.last_id == 7  # max(lastID, entryIDs), like QuPath's loader


def test_minimal_entry_and_project_without_uri(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "project.qpproj").write_text(
        json.dumps(
            {
                "lastID": 0,
                "images": [
                    {"serverBuilder": {"builderType": "uri", "uri": "file:/no.png"}, "entryID": 1}
                ],
            }
        )
    )
    project = QuPathProject(folder)
    entry = project.entry(1)
    assert project.version is None and project.uri is None and project.old_folder is None
    assert entry.name is None and entry.metadata == {} and entry.tags == [] and entry.args == []
    assert entry.provider is None and entry.randomized_name is None
    assert "no stored uri" in project.missing_images_report()


def test_duplicate_names_need_the_id(tmp_path: Path) -> None:
    _project(
        tmp_path / "p", [_entry(1, "file:/a/x.png", "x.png"), _entry(2, "file:/b/x.png", "x.png")]
    )
    project = QuPathProject(tmp_path / "p")
    with pytest.raises(InputError, match=r"ids 1, 2"):
        project.entry("x.png")


# ------------------------------------------------------------------ bad input


def _write(tmp_path: Path, content: Any) -> Path:
    file = tmp_path / "project.qpproj"
    file.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return file


def _good_image(entry_id: int = 1) -> dict[str, Any]:
    return {"serverBuilder": {"builderType": "uri", "uri": "file:/x.png"}, "entryID": entry_id}


def test_missing_file_and_folder_without_project(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        QuPathProject(tmp_path / "nope.qpproj")
    assert str(info.value).startswith(str(tmp_path / "nope.qpproj"))
    with pytest.raises(InputError, match=r"no project\.qpproj in this folder") as info:
        QuPathProject(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "item", "message"),
    [
        ('{"version": "0.5.1", "images": [', None, "not valid JSON"),
        ("[]", None, "expected a JSON object"),
        ({"version": "0.5.1"}, None, "missing key 'images'"),
        ({"version": "0.5.1", "images": {}}, None, "'images' must be a list"),
        ({"images": []}, None, "neither 'version' nor 'lastID'"),
        ({"version": 5, "images": []}, None, "'version' must be a string"),
        ({"lastID": "7", "images": []}, None, "'lastID' must be an integer"),
        ({"version": "0.5.1", "images": [_good_image(), 3]}, "image 1", "expected a JSON object"),
        (
            {
                "version": "0.5.1",
                "images": [
                    _good_image(1),
                    _good_image(2),
                    _good_image(3),
                    {"serverBuilder": {"uri": "file:/x"}},
                ],
            },
            "image 3",
            "missing key 'entryID'",
        ),
        (
            {"version": "0.5.1", "images": [{"entryID": 1}]},
            "image 0",
            "missing key 'serverBuilder'",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "entryID": "1"}]},
            "image 0",
            "'entryID' must be an integer",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "entryID": 1.5}]},
            "image 0",
            "'entryID' must be an integer",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "entryID": True}]},
            "image 0",
            "'entryID' must be an integer",
        ),
        (
            {"version": "0.5.1", "images": [_good_image(4), _good_image(4)]},
            "image 1",
            "duplicate entryID 4 (also image 0)",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "serverBuilder": "file:/x"}]},
            "image 0 (entry 1)",
            "'serverBuilder' must be a JSON object",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "metadata": []}]},
            "image 0 (entry 1)",
            "'metadata' must be a JSON object",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "metadata": {"k": None}}]},
            "image 0 (entry 1)",
            "metadata value of 'k' must be a string",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "tags": "a"}]},
            "image 0 (entry 1)",
            "'tags' must be a list of strings",
        ),
        (
            {"version": "0.5.1", "images": [{**_good_image(), "imageName": 3}]},
            "image 0 (entry 1)",
            "'imageName' must be a string",
        ),
    ],
)
def test_bad_project_files(tmp_path: Path, content: Any, item: str | None, message: str) -> None:
    file = _write(tmp_path, content)
    with pytest.raises(InputError) as info:
        QuPathProject(file)
    error = info.value
    assert error.path == str(file.absolute())
    assert error.item == item
    assert message in error.message
    assert str(error).startswith(str(file.absolute()) + ": ")
    assert "\n" not in str(error)


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    file = _write(tmp_path, '{\n  "version": "0.5.1",\n  "images": [,]\n}')
    with pytest.raises(InputError, match=r"line 3, column 14"):
        QuPathProject(file)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"pathClasses": {}}, "'pathClasses' must be a list"),
        ({"pathClasses": [{"color": 1}]}, "string 'name'"),
        ({"pathClasses": [{"name": "A", "color": "red"}]}, "packed ARGB integer"),
        ({"pathClasses": [{"name": "A", "color": 2**40}]}, "packed ARGB integer"),
    ],
)
def test_bad_classes_file_names_it(tmp_path: Path, classes: Any, message: str) -> None:
    _project(tmp_path, [_good_image()])
    path = tmp_path / "classifiers" / "classes.json"
    path.parent.mkdir()
    path.write_text(classes if isinstance(classes, str) else json.dumps(classes))
    project = QuPathProject(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        _ = project.classes
    assert str(path) in str(info.value)


def test_class_without_colour_gets_qupaths_default(tmp_path: Path) -> None:
    from histosynth.integration.geojson import default_color

    _project(tmp_path, [_good_image()])
    path = tmp_path / "classifiers" / "classes.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "pathClasses": [
                    {"name": "Vessel"},
                    {"name": "Tumor", "color": None},
                    {"name": "Blue", "color": 0xFF0000FF},
                ]
            }
        )
    )
    classes = QuPathProject(tmp_path).classes
    assert classes == {"Vessel": default_color("Vessel"), "Tumor": (200, 0, 0), "Blue": (0, 0, 255)}


# ------------------------------------------------------------------ annotations


def _feature(class_name: Any, x: float, size: float = 10.0) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": "6f1d6c9e-3c0e-4a55-9f3c-0a8f0c6b9a11"
        if x == 0
        else "0e0b8c1a-4d5e-4f60-8a7b-1c2d3e4f5a6b",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x, 0], [x + size, 0], [x + size, size], [x, size], [x, 0]]],
        },
        "properties": {"objectType": "annotation", "classification": class_name},
    }


def _geojson(path: Path, *features: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


@pytest.fixture
def annotated(tmp_path: Path) -> QuPathProject:
    _project(
        tmp_path / "p",
        [
            _entry(1, "file:/x/one.svs", "one.svs"),
            _entry(2, "file:/x/two.ome.tif", "two.ome.tif"),
            _entry(3, "file:/x/three.svs", "three.svs"),
            _entry(4, "file:/x/four.svs", "four.svs"),
        ],
    )
    return QuPathProject(tmp_path / "p", use_paquo=False)


def test_annotations_from_entry_id_geojson(annotated: QuPathProject) -> None:
    folder = annotated.folder / "annotations"
    _geojson(
        folder / "1.geojson",
        _feature({"name": "Vessel: Invasive", "color": [1, 2, 3]}, 0),
        _feature({"name": "Tumor", "color": [200, 0, 0]}, 50, 4),
    )
    _geojson(folder / "one.svs.geojson", _feature({"name": "Other", "color": [0, 0, 0]}, 0))
    assert annotated.annotation_source(1) == folder / "1.geojson"  # the id wins over the name
    found = annotated.annotations(1)
    assert [(a.class_name, a.color, a.geometry.area) for a in found] == [
        ("Vessel: Invasive", (1, 2, 3), 100.0),
        ("Tumor", (200, 0, 0), 16.0),
    ]
    only = annotated.annotations(annotated.entry(1), classes=["Vessel"])
    assert [a.class_name for a in only] == ["Vessel: Invasive"]
    assert found[0].geometry.bounds == (0.0, 0.0, 10.0, 10.0)


def test_annotations_from_image_name_then_name_without_extension(
    annotated: QuPathProject,
) -> None:
    folder = annotated.folder / "annotations"
    _geojson(folder / "two.ome.tif.geojson", _feature({"name": "A", "color": [9, 9, 9]}, 0))
    _geojson(folder / "three.geojson", _feature({"name": "B", "color": [8, 8, 8]}, 0))
    assert annotated.geojson_candidates(2) == [
        folder / "2.geojson",
        folder / "two.ome.tif.geojson",
        folder / "two.ome.geojson",
    ]
    assert annotated.annotation_source("two.ome.tif") == folder / "two.ome.tif.geojson"
    assert [a.class_name for a in annotated.annotations(2)] == ["A"]
    assert annotated.annotation_source(3) == folder / "three.geojson"
    assert [a.class_name for a in annotated.annotations(3)] == ["B"]


def test_colour_comes_from_project_classes_when_the_geojson_has_none(
    annotated: QuPathProject,
) -> None:
    classes = annotated.folder / "classifiers" / "classes.json"
    classes.parent.mkdir()
    classes.write_text(json.dumps({"pathClasses": [{"name": "Vessel", "color": -16776961}]}))
    _geojson(annotated.folder / "annotations" / "1.geojson", _feature("Vessel", 0))
    (found,) = annotated.annotations(1)
    assert found.class_name == "Vessel"
    assert found.color == (0, 0, 255)


def test_entry_without_annotations_warns_and_returns_nothing(
    annotated: QuPathProject, caplog: pytest.LogCaptureFixture
) -> None:
    assert annotated.annotation_source(4) is None
    with caplog.at_level(logging.WARNING, logger="histosynth.integration.qupath.project"):
        assert annotated.annotations(4) == []
    (record,) = caplog.records
    assert "entry 4 'four.svs'" in record.getMessage()
    assert "annotations/4.geojson" in record.getMessage()


def test_qpdata_without_qupath_falls_back_to_geojson(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # point paquo at an empty folder: QuPath is certainly not found there
    monkeypatch.setenv("PAQUO_QUPATH_DIR", str(tmp_path / "no-qupath"))
    _project(
        tmp_path / "p", [_entry(1, "file:/x/a.svs", "a.svs"), _entry(2, "file:/x/b.svs", "b.svs")]
    )
    for entry_id in (1, 2):
        qpdata = tmp_path / "p" / "data" / str(entry_id) / "data.qpdata"
        qpdata.parent.mkdir(parents=True)
        qpdata.write_bytes(b"\xac\xed\x00\x05")  # Java serialisation magic
    geo = _geojson(
        tmp_path / "p" / "annotations" / "1.geojson", _feature({"name": "V", "color": [1, 1, 1]}, 0)
    )
    project = QuPathProject(tmp_path / "p")
    available, reason = project.paquo_status()
    assert not available and "PAQUO_QUPATH_DIR" in reason
    assert project.annotation_source(1) == geo
    assert len(project.annotations(1)) == 1
    with caplog.at_level(logging.WARNING):
        assert project.annotations(2) == []
    message = caplog.records[-1].getMessage()
    assert "entry 2 'b.svs'" in message and "needs QuPath" in message

    forced = QuPathProject(tmp_path / "p", use_paquo=True)
    with pytest.raises(InputError, match="PAQUO_QUPATH_DIR") as info:
        forced.annotation_source(1)
    assert "data.qpdata" in str(info.value)


def test_copy_of_fixture_with_exported_geojson(tmp_path: Path) -> None:
    """A real QuPath 0.6 project plus the GeoJSON the export script writes."""
    folder = tmp_path / "copy"
    shutil.copytree(_fixture("v0.6.0-rc3"), folder)
    _geojson(
        folder / "annotations" / "2.geojson",
        _feature({"name": "muscle", "color": [178, 153, 220]}, 0),
    )
    project = QuPathProject(folder, use_paquo=False)
    (found,) = project.annotations(2)
    assert found.class_name == "muscle"
    assert found.color == project.classes["muscle"]
