"""scripts/bench_seam.py --real-seams --quick end to end: the files, the table, that every
sample pairs a donor with another slide's background alike in every mode, that the crops
sit on the seam (and the real ones at the same distance from real outlines); and the
statistics' anchors. The numbers themselves are not asserted."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
MODES = ["multiband", "none"]  # the bench is the same for every mode; diffusion is slow


def _load(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def real():
    _load("bench_seam")
    return _load("bench_seam_real")


@pytest.fixture(scope="module")
def run(real, tmp_path_factory):
    folder = tmp_path_factory.mktemp("seam")
    out, sheet = folder / "seam-real.json", folder / "sheet.png"
    result = _load("bench_seam").main(
        ["--real-seams", "--world", str(folder / "world"), "--quick", "--modes", *MODES,
         "--out", str(out), "--sheet", str(sheet)])
    return folder, result


def _rows(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "index.csv", newline="", encoding="utf-8") as handle:
        return {r["id"]: r for r in csv.DictReader(handle)}


def test_files_table_and_ranges(real, run):
    folder, result = run
    saved = json.loads((folder / "seam-real.json").read_text(encoding="utf-8"))
    assert saved["samples"] == result["samples"] and len(result["samples"]) >= 2
    assert (folder / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(result["rows"]) == MODES
    for row in [*result["rows"].values(), result["reference"], result["background_reference"]]:
        assert 0 <= row["accuracy_ci"][0] <= row["accuracy_ci"][1] <= 1
        assert 0 <= row["accuracy"] <= 1
        assert row["kid_ci"][0] <= row["kid_ci"][1]
    for mode in MODES:
        assert result["rows"][mode]["samples"] == len(result["samples"])
        assert result["rows"][mode]["s_per_tile"] > 0
        assert 0 < result["rows"][mode]["hf_ratio"] < 3
    # the backgrounds' crops before the paste are real tissue: as sharp as the real crops
    assert 0.7 < result["background_reference"]["hf_ratio"] < 1.4
    assert [d["modes"] for d in result["differences"]] == [MODES]
    printed = real.markdown(result)
    for line in ("| mode | samples | seam-visibility accuracy [95 % CI] |", "| multiband | ",
                 "| none | ", "| reference: real vs real", "| multiband − none | ",
                 "| reference: the backgrounds without their donor, same points | ",
                 "python scripts/bench_seam.py --real-seams --world"):
        assert line in printed


def test_every_sample_pairs_another_slide_alike_in_every_mode(real, run):
    folder, result = run
    runs = {m: _rows(folder / "world" / "runs" / m) for m in MODES}
    assert result["check"]["mismatched_ids"] == [] and result["composites_differ"] == []
    for i in result["samples"]:
        first = runs[MODES[0]][i]
        assert Path(first["donor_image"]).name != Path(first["source_image"]).name
        assert first["background_kind"] == "real"
        for mode in MODES[1:]:
            assert all(runs[mode][i][k] == first[k] for k in real.PAIR_KEYS)
    left_out = set(runs[MODES[0]]) - set(result["samples"])
    assert result["check"]["same_slide_excluded"] <= len(left_out)


def test_band_crops_straddle_the_seam_pasted_side_left(real, run):
    folder, result = run
    crops = 0
    for k, i in enumerate(result["samples"]):
        region = real.pasted_region(folder / "world" / "runs" / "none", i)
        edge = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3)))
        picture = np.repeat(region[..., None].astype(np.uint8) * 255, 3, axis=2)
        for x, y, angle in real.seam_points(region, 8, k):
            assert edge[int(y), int(x)]  # on the pasted region's edge
            crop = real.aligned_crop(picture, x, y, angle)
            assert crop[:, :4].mean() > 200 and crop[:, -4:].mean() < 55  # in | out
            crops += 1
    assert crops >= 2 * len(result["samples"])


def test_real_crops_sit_at_the_ring_from_real_outlines(real, run):
    folder, result = run
    ring = result["context_ring"]
    dataset = folder / "world" / "real"
    donors = {_rows(folder / "world" / "runs" / "none")[i]["source_annotation_id"]
              for i in result["samples"]}
    checked = 0
    for row in _rows(dataset).values():
        if row["source_annotation_id"] not in donors:
            continue
        grown = real.real_region(dataset, row, ring)
        vessel = real.real_region(dataset, row, 0)
        distance = cv2.distanceTransform((~vessel).astype(np.uint8), cv2.DIST_L2, 5)
        for x, y, _ in real.seam_points(grown, 8, 0):
            assert ring - 2 <= distance[int(y), int(x)] <= ring + 2
            checked += 1
    assert checked > 0 and result["real_crops"] >= checked / 2


def test_weighted_kid_is_kid_at_unit_weights_and_ignores_copies(real):
    from histosynth.synthesis.metrics.distribution import kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 0.5
    kernels = real.poly_kernel(a, a), real.poly_kernel(b, b), real.poly_kernel(a, b)
    ones = np.ones(40), np.ones(30)
    assert real.weighted_kid(*kernels, *ones) == pytest.approx(kid(a, b).mean, rel=1e-9)
    # a draw that counts every sample twice is the same distribution: no bias from copies
    assert real.weighted_kid(*kernels, 2 * ones[0], 2 * ones[1]) == pytest.approx(
        kid(a, b).mean, rel=1e-2, abs=1e-3)


def test_classifier_finds_a_difference_and_not_a_non_difference(real):
    rng = np.random.default_rng(1)
    groups = [f"g{k // 4}" for k in range(80)]  # 20 groups of 4 crops
    y = np.array([int(g[1:]) % 2 for g in groups])
    same = rng.normal(size=(80, 6))
    shifted = same + 2.0 * y[:, None]
    ones = np.ones(80)
    found = real.balanced_accuracy(real.cross_validated_correct(shifted, y, groups, 0), y, ones)
    none = real.balanced_accuracy(real.cross_validated_correct(same, y, groups, 0), y, ones)
    assert found > 0.95 and abs(none - 0.5) < 0.2


def test_write_docs_fills_only_between_the_markers(real, tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "evidence.md"
    doc.parent.mkdir()
    doc.write_text(f"head\n{real.DOCS_BEGIN}\nold\n{real.DOCS_END}\ntail <!-- other -->\n",
                   encoding="utf-8")
    monkeypatch.setattr(real, "REPO", tmp_path)
    real.write_docs("| new | table |\n")
    assert doc.read_text(encoding="utf-8") == (
        f"head\n{real.DOCS_BEGIN}\n| new | table |\n{real.DOCS_END}\ntail <!-- other -->\n")


def test_bad_arguments_stop_with_one_line(real, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        real.main(["--world", str(tmp_path / "w"), "--quick", "--write-docs"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        real.main(["--world", str(tmp_path / "w"), "--quick", "--modes", "auto"])
    assert stop.value.code == 1
    assert "--modes: auto is not a --harmonise choice" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
