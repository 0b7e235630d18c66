"""scripts/study_downstream.py --quick at its smallest size: the files, the slide split, the
donor rule and the leakage rule (issue 30). The numbers are not asserted."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_downstream.py"
SMALLEST = ["--quick", "--modes", "none", "--synthetic-only", "none", "--seeds", "1",
            "--variation-model", "tiny"]  # tiny generates from noise (untrained: plumbing)


@pytest.fixture(scope="module")
def study():
    pytest.importorskip("segmentation_models_pytorch")
    spec = importlib.util.spec_from_file_location("study_downstream", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_downstream"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "world"
    assert study.main(["--world", str(folder), *SMALLEST]) == 0
    return folder


def _rows(index: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(index.read_text(encoding="utf-8"), newline="")))


def _stem(path: str) -> str:
    return Path(path).name.split(".")[0]


def test_files_split_and_donors(world):
    record = json.loads((world / "study.json").read_text(encoding="utf-8"))
    assert (world / "study.md").read_text(encoding="utf-8").startswith("Command: `python")
    if importlib.util.find_spec("matplotlib"):
        assert (world / "learning-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    split = json.loads((world / "split.json").read_text(encoding="utf-8"))
    sides = {side: set(split[side]) for side in ("train", "val", "test")}
    assert all(sides.values())
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"]
                or sides["val"] & sides["test"])
    for side, names in sides.items():  # each side's project holds its slides only
        project = json.loads((world / "projects" / side / "project.qpproj").read_text())
        assert {_stem(image["imageName"]) for image in project["images"]} == names
        assert {_stem(r["source_image"]) for r in _rows(world / "real" / side / "index.csv")
                } <= names
    synthetic = _rows(world / "synthetic" / "none" / "index.csv")
    assert synthetic
    for row in synthetic:
        assert {_stem(row["source_image"]), _stem(row["donor_image"])} <= sides["train"]
    arms = {r["arm"]: r for r in record["rows"]}
    assert set(arms) == {"real", "+aug", "+aug +none 1×", "synthetic only none 1×"}
    assert arms["synthetic only none 1×"]["real"] == 0
    assert arms["+aug +none 1×"]["synthetic"] > 0
    assert "UNTRAINED" in " ".join(record["notes"])  # tiny's numbers mean nothing
    # the synthetic tiles of an arm come from the arm's own real vessels only
    training = json.loads(next((world / "trainings").glob("k2-+aug_+none_1x-s0.json"))
                          .read_text(encoding="utf-8"))
    real = {r["id"]: r for r in _rows(world / "real" / "train" / "index.csv")}
    fake = {r["id"]: r for r in synthetic}
    vessels = {real[i]["source_annotation_id"] for i in training["tiles"] if i in real}
    donors = {fake[i]["source_annotation_id"] for i in training["tiles"] if i in fake}
    assert vessels and donors and donors <= vessels


def test_variation_arms_classify_with_the_arms_own_vessels(world):
    record = json.loads((world / "study.json").read_text(encoding="utf-8"))
    arms = {r["arm"]: r for r in record["classification"]}
    assert set(arms) == {"real", "+aug", "+aug +variation 1×"}
    assert arms["+aug +variation 1×"]["synthetic"] > 0 and arms["real"]["synthetic"] == 0
    for row in arms.values():
        assert set(row) >= {"f1", "balanced_accuracy", "sensitivity", "specificity"}
    variation = {r["id"]: r for r in _rows(world / "synthetic" / "variation" / "index.csv")}
    assert variation and all(r["synthesis_type"] == "variation" for r in variation.values())
    train = set(json.loads((world / "split.json").read_text(encoding="utf-8"))["train"])
    for row in variation.values():  # generated from training slides' vessels only
        assert {_stem(row["source_image"]), _stem(row["donor_image"])} <= train
    training = json.loads((world / "trainings" / "cls-k2-+aug_+variation_1x-s0.json")
                          .read_text(encoding="utf-8"))
    real = {r["id"]: r for r in _rows(world / "real" / "train" / "index.csv")}
    vessels = {real[i]["source_annotation_id"] for i in training["tiles"] if i in real}
    made = {variation[i]["source_annotation_id"] for i in training["tiles"] if i in variation}
    assert vessels and made and made <= vessels
    assert "Classification, invasive or not" in (world / "study.md").read_text(encoding="utf-8")


def test_an_engine_that_does_not_generate_leaves_the_variation_arms_out(study):
    generates, note = study.sibling("study_variation").engine_note("default")
    assert not generates and "generates no tile from noise" in note


@pytest.mark.parametrize(("run", "column"), [("none", "source_image"), ("none", "donor_image"),
                                            ("variation", "source_image")])
def test_synthetic_tile_from_a_test_slide_fails_the_study(study, world, run, column, capsys):
    index = world / "synthetic" / run / "index.csv"
    before_index, before_study = index.read_bytes(), (world / "study.json").read_bytes()
    rows = _rows(index)
    test_slide = next((world / "projects" / "test" / "slides").glob("*.ome.tif"))
    rows[0][column] = str(test_slide)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    index.write_text(buffer.getvalue(), encoding="utf-8")
    try:
        assert study.main(["--world", str(world), *SMALLEST]) == 1
        err = capsys.readouterr().err
        assert "leakage" in err and rows[0]["id"] in err and column in err
        assert (world / "study.json").read_bytes() == before_study  # nothing written
    finally:
        index.write_bytes(before_index)


def test_tiles_of_two_runs_with_the_same_ids_load_their_own_pixels(study, tmp_path):
    """Runs of different seam modes number their tiles alike (inp-00000, …): each arm
    must train on its own run's pixels, not on the first run's that shared the id."""
    import cv2
    import numpy as np

    tiles = []
    for value, run in ((40, "diffusion"), (200, "none")):
        folder = tmp_path / run
        folder.mkdir()
        cv2.imwrite(str(folder / "i.png"), np.full((32, 32, 3), value, np.uint8))
        cv2.imwrite(str(folder / "m.png"), np.full((32, 32), 255, np.uint8))
        tiles.append(study.Tile("inp-00000", folder / "i.png", folder / "m.png", "Vessel", "v"))
    cache: dict = {}
    first, _ = study.load_arrays(tiles[:1], 16, cache)
    second, _ = study.load_arrays(tiles[1:], 16, cache)
    assert first.max() == 40 and second.min() == 200


def test_a_lab_project_s_synthetic_entries_are_never_split_as_slides(study, tmp_path, capsys):
    """--project on a project histosynth already added tiles to: its synthetic entries
    (marked for review) are left out, so no synthetic tile is a training or test slide."""
    from click.testing import CliRunner

    from histosynth.cli import main as cli

    done = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--count", "2"])
    assert done.exit_code == 0, done.output
    project = tmp_path / "demo" / "project" / "project.qpproj"
    entries = json.loads(project.read_text(encoding="utf-8"))["images"]
    assert any(e["imageName"].startswith("synthetic-") for e in entries)
    size = study.Size(**{**study.QUICK})
    split = study.build_project_world(tmp_path / "world", project, size)
    named = split["train"] + split["val"] + split["test"]
    assert sorted(named) == sorted(_stem(e["imageName"]) + ".ome" for e in entries
                                   if not e["imageName"].startswith("synthetic-"))
    assert "left out 2 entries histosynth added" in capsys.readouterr().out
