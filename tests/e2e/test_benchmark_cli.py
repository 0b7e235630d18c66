"""``histosynth benchmark downstream`` end to end on a demo project of four slides: real
tiles from ``extract``, synthetic ones from ``synthesize`` + ``export``, a tiny encoder,
two folds — the whole path the full configuration runs on a GPU (issue: downstream)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.integration.splits import read_labelled_tiles, read_split_file

TILE, MPP = 128, 1.0
SMALL = ["--folds", 2, "--epochs", 1, "--batch-size", 4, "--encoder"]


@pytest.fixture(scope="module")
def sets(invoke, tmp_path_factory):
    pytest.importorskip("segmentation_models_pytorch")
    root = tmp_path_factory.mktemp("downstream")
    slides = [build_demo_slide(root / "slides" / f"slide-{i}.ome.tif", width=1536, height=1024,
                               seed=i) for i in range(4)]
    project = build_demo_project(root / "project", slide=slides)
    common = ["--project", project, "--class", "Vessel", "--tile-size", TILE, "--mpp", MPP]
    for args in (
        ["extract", *common, "--out", root / "real"],
        ["synthesize", *common, "--count", 10, "--model", "tiny", "--harmonise", "multiband",
         "--write-project", "none", "--out", root / "run"],
        ["export", root / "run", "--out", root / "synthetic", "--include-pending"],
    ):
        result = invoke("-q", *args)
        assert result.exit_code == 0, result.output + result.stderr
    return root


def _bench(invoke, sets, out, *extra, encoder="tu-mobilenetv3_small_050", real=None):
    return invoke("-q", "benchmark", "downstream", "--real", real or sets / "real",
                  "--synthetic", sets / "synthetic", *SMALL, encoder, "--out", out, *extra)


def test_segmentation_runs_end_to_end_and_writes_the_table(invoke, sets):
    out = sets / "bench"
    result = _bench(invoke, sets, out)
    assert result.exit_code == 0, result.output + result.stderr
    for label in ("| Source |", "| + Augmentation |", "| + Augmentation + Synthetic |"):
        assert label in result.output
    assert "| Method | IoU | Sensitivity | Specificity |" in result.output
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [r["method"] for r in rows] == ["Source", "+ Augmentation",
                                           "+ Augmentation + Synthetic"]
    doc = json.loads((out / "results.json").read_text())
    for arm in ("source", "augmented", "synthetic"):
        assert len(doc["per_fold"][arm]["iou"]) == 2
        assert all(0 <= v <= 1 for v in doc["per_fold"][arm]["iou"])
    assert (out / "folds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = sorted(p.name for p in (out / "folds").iterdir())
    assert len(records) == 6 and "fold-1-synthetic.json" in records


def test_the_split_file_obeys_the_three_rules(invoke, sets):
    out = sets / "bench"
    if not (out / "splits.json").is_file():
        assert _bench(invoke, sets, out).exit_code == 0
    real = {t.id: t for t in read_labelled_tiles(sets / "real")}
    fake = {t.id: t for t in read_labelled_tiles(sets / "synthetic")}
    doc = read_split_file(out / "splits.json")
    assert len(doc["folds"]) == 2
    for fold in doc["folds"]:
        held = set(fold["slides"]["val"]) | set(fold["slides"]["test"])
        # 1. real tiles follow their slide: each side's groups are its slides
        for side, key in (("train_real", "train"), ("val", "val"), ("test", "test")):
            assert {real[i].slide_group for i in fold[side]} <= set(fold["slides"][key])
        # 2. validation and test hold real tiles only
        assert all(i in real and i not in fake for i in fold["val"] + fold["test"])
        # 3. no trained synthetic tile touches a held-out slide, and every one left out does
        assert all(not (fake[i].slides & held) for i in fold["train_synthetic"])
        assert all(fake[e["id"]].slides & held for e in fold["excluded_synthetic"])
        assert len(fold["train_synthetic"]) + len(fold["excluded_synthetic"]) == len(fake)
        assert sum(len(fold[k]) for k in ("train_real", "val", "test")) == len(real)


def test_resume_skips_finished_folds_and_refuses_other_settings(invoke, sets):
    out = sets / "bench-resume"
    assert _bench(invoke, sets, out).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "folds").iterdir()}
    (out / "folds" / "fold-1-synthetic.json").unlink()
    again = _bench(invoke, sets, out, "--resume")
    assert again.exit_code == 0, again.output + again.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "folds").iterdir()}
    assert set(after) == set(before)
    assert all(after[n] == before[n] for n in before if n != "fold-1-synthetic.json")
    refused = _bench(invoke, sets, out, "--resume", "--seed", 5)
    assert refused.exit_code == 1 and "cannot resume" in refused.stderr and "seed" in refused.stderr
    busy = _bench(invoke, sets, out)
    assert busy.exit_code == 1 and "--resume" in busy.stderr


def _copy_with(sets, name, change):
    """A copy of the real dataset whose index rows are changed by ``change``."""
    folder = sets / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(sets / "real", folder)
    index = folder / "index.csv"
    with index.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    for row in rows:
        change(row)
    with index.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("one-slide", "needs at least 3"),
        ("no-masks", "segmentation needs masks"),
        ("all-clean", "no invasive one"),
    ],
)
def test_bad_input_is_one_line(invoke, sets, case, match):
    extra = []
    if case == "one-slide":
        real = _copy_with(sets, "one-slide", lambda r: r.update(source_image="/s/only.tif"))
    elif case == "no-masks":
        real = _copy_with(sets, "no-masks", lambda r: r.update(mask_path=""))
    else:
        real = _copy_with(sets, "all-clean", lambda r: r.update(class_name="Vessel"))
        extra = ["--task", "classification"]
    encoder = "mobilenetv3_small_050" if extra else "tu-mobilenetv3_small_050"
    result = _bench(invoke, sets, sets / f"bench-{case}", *extra, encoder=encoder, real=real)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("histosynth: error")]
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert not (sets / f"bench-{case}").exists()  # refused before anything was written


def test_classification_of_invasive_vessels_runs_end_to_end(invoke, sets):
    out = sets / "bench-classification"
    result = _bench(invoke, sets, out, "--task", "classification",
                    encoder="mobilenetv3_small_050")
    assert result.exit_code == 0, result.output + result.stderr
    assert "| Method | F1 | Sensitivity | Specificity |" in result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "classification" and set(doc["summary"]) == {
        "source", "augmented", "synthetic"}
    assert all(len(doc["per_fold"][arm]["specificity"]) == 2 for arm in doc["per_fold"])


def test_the_benchmark_runs_on_the_demos_own_export(invoke, tmp_path):
    """What the README shows: ``histosynth demo``, its real tiles extracted, its run
    exported, the benchmark at the small configuration (the demo has three slides)."""
    pytest.importorskip("segmentation_models_pytorch")
    demo = tmp_path / "demo"
    for args in (
        ["demo", "--out", demo, "--count", 3, "--model", "tiny", "--tile-size", 256],
        ["extract", "--project", demo / "project", "--class", "Vessel", "--tile-size", 256,
         "--out", demo / "real"],
        ["export", demo / "run", "--out", demo / "synthetic", "--include-pending"],
        ["benchmark", "downstream", "--real", demo / "real", "--synthetic",
         demo / "synthetic", *SMALL, "tu-mobilenetv3_small_050", "--out", demo / "bench"],
    ):
        result = invoke("-q", *args)
        assert result.exit_code == 0, result.output + result.stderr
    assert "from 3 slide(s)" in result.output and "| + Augmentation + Synthetic |" in result.output
    assert (demo / "bench" / "results.csv").is_file()
