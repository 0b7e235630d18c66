"""Changing an entry's metadata value in ``project.qpproj`` (a reviewer's decision from the
browser): on the files of real QuPath versions with histosynth's entries appended, only
the value's text (and ``modifyTimestamp``) changes; every other byte is kept."""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.integration.errors import InputError
from histosynth.integration.qupath.gson import (
    append_entries_text,
    gson_json,
    set_metadata_text,
)
from histosynth.integration.qupath.project import QuPathProject

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qupath"
VERSIONS = sorted(p.name for p in FIXTURES.iterdir() if (p / "project.qpproj").is_file())


def synthetic(entry_id: int, status: str = "pending") -> dict:
    return {
        "serverBuilder": {"builderType": "uri", "uri": f"file:/tmp/t{entry_id}.tif"},
        "entryID": entry_id,
        "randomizedName": f"00000000-0000-0000-0000-{entry_id:012d}",
        "imageName": f"synthetic-run-t{entry_id}",
        "metadata": {"histosynth.id": f"t{entry_id}", "review_status": status},
    }


def with_entries(version: str) -> str:
    text = (FIXTURES / version / "project.qpproj").read_text(encoding="utf-8")
    return append_entries_text(text, [synthetic(101), synthetic(102)], 102, 1_700_000_000_000)


def changed_lines(a: str, b: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_only_the_value_and_the_timestamp_change(version):
    before = with_entries(version)
    images = len(json.loads(before)["images"])
    after = set_metadata_text(
        before, {images - 1: {"review_status": "accepted"}}, 1_800_000_000_000
    )
    doc = json.loads(after)
    assert doc["images"][-1]["metadata"]["review_status"] == "accepted"
    assert doc["images"][-2]["metadata"]["review_status"] == "pending"
    assert doc["modifyTimestamp"] == 1_800_000_000_000
    changes = changed_lines(before, after)
    assert len(changes) == 4  # the status line and the timestamp line, each - and +
    assert all("review_status" in c or "modifyTimestamp" in c for c in changes)


@settings(max_examples=40, deadline=None)
@given(value=st.text(max_size=30))
def test_any_value_round_trips_with_gson_escapes(value):
    before = with_entries("v0.4.0")
    after = set_metadata_text(before, {4: {"review_status": value}})
    assert json.loads(after)["images"][4]["metadata"]["review_status"] == value
    # written as QuPath's Gson writes it (< > & = ' escaped, non-ASCII kept)
    assert '"review_status": ' + gson_json(value, indent=None) in after
    assert len(after) - len(before) == len(gson_json(value, indent=None)) - len('"pending"')


def test_a_missing_key_or_entry_is_refused():
    text = with_entries("v0.6.0-rc3")
    with pytest.raises(ValueError, match="no metadata 'reviewer'"):
        set_metadata_text(text, {4: {"reviewer": "x"}})
    with pytest.raises(ValueError, match="there is no image 99"):
        set_metadata_text(text, {99: {"review_status": "x"}})


def test_the_project_saves_a_decision_with_a_backup(tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(FIXTURES / "v0.4.0", folder)
    file = folder / "project.qpproj"
    file.write_text(with_entries("v0.4.0"), encoding="utf-8")
    original = file.read_bytes()
    project = QuPathProject(file, use_paquo=False)
    entry = project.entry(102)
    project.set_metadata(entry, "review_status", "rejected")
    backup = project.save()
    assert backup is not None and backup.read_bytes() == original
    again = QuPathProject(file, use_paquo=False)
    assert again.entry(102).metadata["review_status"] == "rejected"
    assert again.entry(101).metadata["review_status"] == "pending"
    with pytest.raises(InputError, match="no metadata 'reviewer'"):
        again.set_metadata(101, "reviewer", "ann")
    # the file changed on disk (QuPath saved it): refused, nothing written
    again.set_metadata(101, "review_status", "accepted")
    file.write_bytes(file.read_bytes() + b"\n")
    changed = file.read_bytes()
    with pytest.raises(InputError, match="changed on disk"):
        again.save()
    assert file.read_bytes() == changed
