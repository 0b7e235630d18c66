"""End to end through the command line: demo → project write-back → review → export.

The QuPath side is the project file itself (QuPath cannot run here): entries are checked
against the format of the fixtures, reviewers' decisions are written into the entries'
metadata as QuPath's metadata editor (or the Accept / Reject scripts) would.
"""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from histosynth.cli import main
from histosynth.integration.dataset import read_index
from histosynth.integration.qupath import QuPathProject


@pytest.fixture(scope="module")
def demo(invoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("roundtrip")
    result = invoke(
        "demo", "--out", out, "--count", 3, "--steps", 1, "--model", "tiny", "--tile-size", 256
    )
    assert result.exit_code == 0, result.output + result.stderr
    return out


def test_demo_adds_its_tiles_to_the_project_marked_for_review(demo):
    project_file = demo / "project" / "project.qpproj"
    before = json.loads((demo / "project" / "project.qpproj.backup").read_text())
    after = json.loads(project_file.read_text())
    n = len(before["images"])
    assert after["images"][:n] == before["images"]  # originals untouched
    added = after["images"][n:]
    assert len(added) == 3
    ids = [e["entryID"] for e in added]
    assert min(ids) > max(e["entryID"] for e in before["images"])
    assert after["lastID"] == max(ids)
    rows = {r["id"]: r for r in read_index(demo / "run")}
    for entry in added:
        meta = entry["metadata"]
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["histosynth.synthetic"] == "true" and meta["review_status"] == "pending"
        assert meta["histosynth.id"] in rows
        assert entry["tags"] == ["histosynth", "synthetic"]
        assert entry["imageName"] == f"synthetic-{meta['histosynth.run']}-{meta['histosynth.id']}"
        assert entry["serverBuilder"]["uri"].startswith("file:/")
        assert (demo / "project" / "annotations" / f"{entry['entryID']}.geojson").is_file()
    project = QuPathProject(project_file)
    assert not project.missing_images()


def test_demo_twice_adds_nothing(invoke, demo):
    before = (demo / "project" / "project.qpproj").read_text()
    result = invoke(
        "demo", "--out", demo, "--count", 3, "--steps", 1, "--model", "tiny", "--tile-size", 256
    )
    assert result.exit_code == 0, result.stderr
    assert (demo / "project" / "project.qpproj").read_text() == before


def test_review_decisions_reach_the_index_gallery_and_export(invoke, demo, tmp_path):
    project_file = demo / "project" / "project.qpproj"
    document = json.loads(project_file.read_text())
    synthetic = [
        e for e in document["images"] if e["metadata"].get("histosynth.synthetic") == "true"
    ]
    decisions = {
        synthetic[0]["metadata"]["histosynth.id"]: "accepted",
        synthetic[1]["metadata"]["histosynth.id"]: "rejected",
    }
    for entry in synthetic[:2]:
        entry["metadata"]["review_status"] = decisions[entry["metadata"]["histosynth.id"]]
    project_file.write_text(json.dumps(document, indent=2))

    result = invoke("review", "sync", demo / "project", "--run", demo / "run")
    assert result.exit_code == 0, result.stderr
    statuses = {r["id"]: r["review_status"] for r in read_index(demo / "run")}
    for tile_id, decision in decisions.items():
        assert statuses[tile_id] == decision
    assert list(statuses.values()).count("pending") == 1

    result = invoke("review", "gallery", demo / "run")
    assert result.exit_code == 0, result.stderr
    page = (demo / "run" / "review.html").read_text()
    assert page.count('class="card"') == 3

    out = tmp_path / "export"
    result = invoke("export", demo / "run", "--out", out)
    assert result.exit_code == 0, result.stderr
    with (out / "train" / "metadata.csv").open(newline="") as handle:
        exported = list(csv.DictReader(handle))
    assert [r["id"] for r in exported] == [t for t, d in decisions.items() if d == "accepted"]
    out2 = tmp_path / "export-pending"
    result = invoke("export", demo / "run", "--out", out2, "--include-pending")
    assert result.exit_code == 0, result.stderr
    with (out2 / "train" / "metadata.csv").open(newline="") as handle:
        ids = {r["id"] for r in csv.DictReader(handle)}
    rejected = next(t for t, d in decisions.items() if d == "rejected")
    assert rejected not in ids and len(ids) == 2


def test_write_project_needs_a_project(demo, tmp_path):
    geojson = demo / "project" / "annotations" / "1.geojson"
    slide = demo / "project" / "slides" / "demo-slide-1.ome.tif"
    result = CliRunner().invoke(
        main,
        [
            "synthesize",
            "--slide",
            str(slide),
            "--annotations",
            str(geojson),
            "--class",
            "Vessel",
            "--count",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--write-project",
            "native",
        ],
    )
    assert result.exit_code == 2
    assert "--write-project needs --project" in result.output + result.stderr
