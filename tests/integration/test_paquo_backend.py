"""paquo backend: the clear message when QuPath is missing (always runs), the conversion of
QuPath objects, and - only where a QuPath installation is found - a real round trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import (
    GeometryCollection,
    LineString,
    MultiPolygon,
    Point,
    Polygon,
    box,
)

from histosynth.integration.errors import InputError
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.qupath.paquo_backend import (
    annotation_from_parts,
    qupath_available,
    read_annotations_with_paquo,
)


def _minimal_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "project.qpproj"
    file.write_text(
        json.dumps(
            {
                "version": "0.5.1",
                "createTimestamp": 0,
                "modifyTimestamp": 0,
                "lastID": 1,
                "images": [
                    {
                        "serverBuilder": {"builderType": "uri", "uri": "file:/x.png"},
                        "entryID": 1,
                        "imageName": "x.png",
                        "metadata": {},
                    }
                ],
            }
        )
    )
    return file


# ------------------------------------------------------------------ QuPath absent


def test_missing_qupath_gives_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "not-qupath"
    empty.mkdir()
    monkeypatch.setenv("PAQUO_QUPATH_DIR", str(empty))
    available, reason = qupath_available()
    assert available is False
    assert "no valid QuPath installation found" in reason
    assert str(empty) in reason
    assert "PAQUO_QUPATH_DIR" in reason
    assert "\n" not in reason

    file = _minimal_project(tmp_path / "p")
    with pytest.raises(InputError) as info:
        read_annotations_with_paquo(file, 1, ["Vessel"])
    message = str(info.value)
    assert message.startswith(f"{file}: entry 1: cannot read QuPath objects: ")
    assert "PAQUO_QUPATH_DIR" in message
    assert "\n" not in message


def test_forced_paquo_on_a_project_without_qupath_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAQUO_QUPATH_DIR", str(tmp_path / "nowhere"))
    file = _minimal_project(tmp_path / "p")
    qpdata = tmp_path / "p" / "data" / "1" / "data.qpdata"
    qpdata.parent.mkdir(parents=True)
    qpdata.write_bytes(b"\xac\xed\x00\x05")
    with pytest.raises(InputError, match="QuPath installation"):
        QuPathProject(file, use_paquo=True).annotations(1)


# ------------------------------------------------------------------ conversion


def test_polygon_with_class_colour_id_and_measurements() -> None:
    shell = [(0, 0), (40, 0), (40, 30), (0, 30)]
    hole = [(10, 10), (20, 10), (20, 20), (10, 20)]
    annotation = annotation_from_parts(
        Polygon(shell, [hole]),
        class_name="Vessel: Invasive",
        color=(200, 10, 20),
        object_id="6f1d6c9e-3c0e-4a55-9f3c-0a8f0c6b9a11",
        name="v1",
        measurements={"Area px": 1100, "bad": float("nan"), "text": "x"},
        properties={"isLocked": True},
    )
    assert annotation is not None
    assert annotation.geometry.area == 40 * 30 - 100
    assert annotation.class_name == "Vessel: Invasive"
    assert annotation.color == (200, 10, 20)
    assert annotation.id == "6f1d6c9e-3c0e-4a55-9f3c-0a8f0c6b9a11"
    assert annotation.name == "v1"
    assert annotation.measurements == {"Area px": 1100.0}
    assert annotation.properties == {"isLocked": True}
    assert annotation.object_type == "annotation"


def test_invalid_bowtie_is_repaired_into_two_triangles() -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bowtie.is_valid
    annotation = annotation_from_parts(bowtie, class_name=None, color=None)
    assert annotation is not None
    assert annotation.geometry.is_valid
    assert isinstance(annotation.geometry, MultiPolygon)
    assert annotation.geometry.area == pytest.approx(50.0)
    assert annotation.class_name is None and annotation.color is None
    assert len(annotation.id) == 36  # a fresh UUID when QuPath gave none


@pytest.mark.parametrize("geometry", [Point(1, 2), LineString([(0, 0), (5, 5)]), Polygon()])
def test_rois_without_area_are_skipped_with_a_warning(
    geometry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert (
            annotation_from_parts(geometry, class_name="V", color=None, label="entry 3 #7") is None
        )
    if not geometry.is_empty:
        assert "entry 3 #7" in caplog.text


def test_collection_keeps_only_its_areas() -> None:
    mixed = GeometryCollection([box(0, 0, 2, 2), LineString([(5, 5), (9, 9)]), box(10, 10, 13, 13)])
    annotation = annotation_from_parts(mixed, class_name="V", color=(1, 2, 3))
    assert annotation is not None
    assert isinstance(annotation.geometry, MultiPolygon)
    assert annotation.geometry.area == 4 + 9


# ------------------------------------------------------------------ real QuPath

_AVAILABLE, _REASON = qupath_available()
needs_qupath = pytest.mark.skipif(not _AVAILABLE, reason=_REASON)


@needs_qupath
def test_round_trip_through_qupath(tmp_path: Path) -> None:
    import tifffile
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject as PaquoProject

    image = tmp_path / "slide.tif"
    tifffile.imwrite(image, np.full((64, 96, 3), 200, dtype=np.uint8), photometric="rgb")
    vessel = QuPathPathClass("Vessel", color=(200, 0, 0))
    invasive = QuPathPathClass("Invasive", parent=vessel, color=(0, 0, 250))
    with PaquoProject(tmp_path / "proj", mode="x") as qp:
        entry = qp.add_image(image)
        entry.hierarchy.add_annotation(roi=box(10, 10, 30, 20), path_class=invasive)
        entry.hierarchy.add_annotation(roi=box(40, 40, 50, 50), path_class=QuPathPathClass("Tumor"))
        entry_id = int(entry.entry_id)
        qp.save()

    project = QuPathProject(tmp_path / "proj")
    assert project.paquo_status()[0]
    assert project.annotation_source(entry_id).name == "data.qpdata"
    found = project.annotations(entry_id, classes=["Vessel"])
    assert [(a.class_name, a.color, a.geometry.area) for a in found] == [
        ("Vessel: Invasive", (0, 0, 250), 200.0)
    ]
    assert len(project.annotations(entry_id)) == 2
