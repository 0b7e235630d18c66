"""``histosynth qupath install-scripts`` adds the sketch class ("Vessel sketch", its own
colour) to a project's ``classifiers/classes.json``: on copies of projects written by
real QuPath versions (``tests/fixtures/qupath``), keeping every class they have, backing
the file up first, idempotent, and refusing an unreadable file before writing anything."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.cli import main
from histosynth.integration.annotations import class_matches
from histosynth.integration.class_colours import argb_to_rgb, default_color, rgb_to_argb
from histosynth.integration.demo.data import CLASS_INVASIVE, CLASS_VESSEL
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.qupath.classes import (
    QUPATH_DEFAULT_CLASSES,
    SKETCH_CLASS,
    SKETCH_COLOUR,
    add_project_classes,
)
from histosynth.integration.qupath.gson import gson_json
from histosynth.integration.qupath.project_classes import read_project_classes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qupath"
WITH_CLASSES = ["v0.4.0", "v0.6.0-rc3"]
SKETCH_ITEM = {"name": SKETCH_CLASS, "color": rgb_to_argb(SKETCH_COLOUR)}


def copy_project(version: str, to: Path) -> Path:
    """A copy of the real QuPath project of ``version``; its folder."""
    folder = to / version
    shutil.copytree(FIXTURES / version, folder)
    return folder


def install(folder: Path, *extra: str):
    return CliRunner().invoke(
        main, ["qupath", "install-scripts", str(folder), "--python", sys.executable, *extra]
    )


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("histosynth: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("version", WITH_CLASSES)
def test_the_sketch_class_is_added_after_the_projects_own(version: str, tmp_path: Path) -> None:
    folder = copy_project(version, tmp_path)
    path = folder / "classifiers" / "classes.json"
    before, project_before = path.read_bytes(), (folder / "project.qpproj").read_bytes()
    result = install(folder)
    assert result.exit_code == 0, result.output
    assert f"class 'Vessel sketch' added to {path} (previous file: classes.json.backup)" in (
        result.output)
    after = json.loads(path.read_bytes())
    old = json.loads(before)["pathClasses"]
    assert after == {"pathClasses": [*old, SKETCH_ITEM]}  # every class kept, in order
    assert path.read_bytes() == gson_json(after).encode()  # QuPath's own layout
    assert (folder / "classifiers" / "classes.json.backup").read_bytes() == before
    assert (folder / "project.qpproj").read_bytes() == project_before
    assert QuPathProject(folder, use_paquo=False).classes[SKETCH_CLASS] == SKETCH_COLOUR
    assert (folder / "scripts" / "histosynth" / "Synthesize_vessels.groovy").is_file()
    assert not (folder / ".histosynth-project.lock").exists()

    again = install(folder)  # idempotent: nothing written, the backup still the original
    assert again.exit_code == 0, again.output
    assert f"class 'Vessel sketch': already in {path}" in again.output
    assert json.loads(path.read_bytes()) == after
    assert (folder / "classifiers" / "classes.json.backup").read_bytes() == before


def test_a_project_without_classes_gets_qupaths_defaults_and_the_sketch(tmp_path: Path) -> None:
    folder = copy_project("v0.3.2", tmp_path)  # QuPath 0.3.2 wrote no classes.json here
    result = install(folder)
    assert result.exit_code == 0, result.output
    written = json.loads((folder / "classifiers" / "classes.json").read_text())["pathClasses"]
    real_defaults = json.loads(
        (FIXTURES / "v0.4.0" / "classifiers" / "classes.json").read_text())["pathClasses"][:9]
    assert written == [*real_defaults, SKETCH_ITEM]  # as a new QuPath project lists them
    assert [c["name"] for c in real_defaults] == list(QUPATH_DEFAULT_CLASSES)
    assert not (folder / "classifiers" / "classes.json.backup").exists()


def test_a_sketch_class_the_project_has_keeps_its_colour(tmp_path: Path) -> None:
    folder = copy_project("v0.4.0", tmp_path)
    path = folder / "classifiers" / "classes.json"
    data = json.loads(path.read_text())
    data["pathClasses"].insert(2, {"name": SKETCH_CLASS, "color": -16711936})
    path.write_text(json.dumps(data, indent=2))
    before = path.read_bytes()
    assert install(folder).exit_code == 0
    assert path.read_bytes() == before and not path.with_name("classes.json.backup").exists()


def test_no_sketch_class_leaves_the_classes_alone(tmp_path: Path) -> None:
    folder = copy_project("v0.6.0-rc3", tmp_path)
    before = (folder / "classifiers" / "classes.json").read_bytes()
    result = install(folder, "--no-sketch-class")
    assert result.exit_code == 0 and "Vessel sketch" not in result.output
    assert (folder / "classifiers" / "classes.json").read_bytes() == before


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"pathClasses": [', "not valid JSON"),
        ('{"pathClasses": {"name": "Tumor"}}', "'pathClasses' must be a list"),
        ('{"pathClasses": [{"name": "Tumor", "color": "red"}]}', "class 'Tumor'"),
        ('{"pathClasses": [{"color": 3}]}', "class 0"),
    ],
)
def test_an_unreadable_classes_file_is_one_line_and_nothing_is_written(
    tmp_path: Path, content: str, says: str
) -> None:
    folder = copy_project("v0.4.0", tmp_path)
    path = folder / "classifiers" / "classes.json"
    path.write_text(content)
    line = one_error_line(install(folder))
    assert str(path) in line and says in line, line
    assert path.read_text() == content
    assert not path.with_name("classes.json.backup").exists()
    assert not (folder / "scripts").exists()


def test_the_sketch_colour_is_its_own() -> None:
    """Far (RGB distance ≥ 100) from every class colour QuPath or histosynth gives: the
    built-in classes, the classes of the real projects, the demo's vessel classes."""
    colours = {name: default_color(name) for name in (
        *QUPATH_DEFAULT_CLASSES, "Image", "1+", "2+", "3+", CLASS_VESSEL, CLASS_INVASIVE)}
    for version in WITH_CLASSES:
        colours.update(read_project_classes(FIXTURES / version / "classifiers" / "classes.json"))
    distance = {name: sum((a - b) ** 2 for a, b in zip(rgb, SKETCH_COLOUR, strict=True)) ** 0.5
                for name, rgb in colours.items()}
    assert min(distance.values()) >= 100, sorted(distance.items(), key=lambda kv: kv[1])[:3]
    assert argb_to_rgb(SKETCH_ITEM["color"]) == SKETCH_COLOUR


def test_a_sketch_is_never_taken_for_a_vessel() -> None:
    assert not class_matches(SKETCH_CLASS, CLASS_VESSEL)
    assert not class_matches(SKETCH_CLASS, CLASS_INVASIVE)


names = st.text(
    st.characters(codec="utf-8", exclude_characters=":\r\n", exclude_categories=("Cs",)),
    min_size=1, max_size=12,
).map(str.strip).filter(bool)
existing_classes = st.lists(
    st.tuples(names, st.integers(-(2**31), 2**31 - 1)), max_size=6, unique_by=lambda c: c[0]
)


@settings(max_examples=30, deadline=None)
@given(existing_classes)
def test_any_class_list_is_kept_and_the_sketch_added_once(classes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "project.qpproj").write_text("{}")
        path = folder / "classifiers" / "classes.json"
        path.parent.mkdir()
        items = [{"name": name, "color": color} for name, color in classes]
        path.write_text(gson_json({"pathClasses": items}))
        first = add_project_classes(folder)
        has_sketch = any(name == SKETCH_CLASS for name, _ in classes)
        stored = json.loads(path.read_text())["pathClasses"]
        assert stored == items + ([] if has_sketch else [SKETCH_ITEM])
        assert first.added == (() if has_sketch else (SKETCH_CLASS,))
        second = add_project_classes(folder)
        assert second.added == () and json.loads(path.read_text())["pathClasses"] == stored
