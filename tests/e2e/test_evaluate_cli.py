"""``histosynth evaluate`` on real files: a run and a real dataset written by RunWriter
from real H&E crops, the tiny feature space (issue: fidelity metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import box

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord
from histosynth.integration.demo.data import he_source_image

TILE = 64


def _write(folder: Path, kind: str, count: int, offset: int, *, refs: bool = False,
           donors: list[str] | None = None) -> None:
    he = he_source_image()
    extra = ("donor_image",) if kind == "inpainting" else ()
    with RunWriter(folder, config={"mode": kind}, extra_columns=extra) as writer:
        for n in range(count):
            y, x = divmod(offset + 37 * n, 900)
            image = np.ascontiguousarray(he[y % 900 : y % 900 + TILE, x : x + TILE])
            if kind != "extracted":
                image = cv2.GaussianBlur(image, (0, 0), 1.0)  # a little unlike the real ones
            mask = np.zeros((TILE, TILE), np.uint8)
            cv2.circle(mask, (32, 32), 12, 255, -1)
            record = TileRecord(
                id=f"{kind[:3]}-{n:04d}", synthesis_type=kind, class_name="Vessel",
                source_image="slide.tif", source_entry_id="1",
                source_annotation_id=(donors[n] if donors else f"vessel-{n}"),
                tile_x=x, tile_y=y, tile_size=TILE, mpp=0.5,
            )
            if kind == "inpainting":
                record.extra["donor_image"] = "slide.tif"
            ref = {"background": he[y % 900 : y % 900 + TILE, x : x + TILE]} if refs else None
            writer.add_tile(record, image, mask, [Annotation(box(20, 20, 44, 44),
                                                             class_name="Vessel")], refs=ref)


@pytest.fixture
def sets(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))
    real, run = tmp_path / "real", tmp_path / "run"
    _write(real, "extracted", 24, 0)
    _write(run, "inpainting", 12, 5000, refs=True, donors=[f"vessel-{n}" for n in range(12)])
    return run, real


def test_evaluate_writes_the_table_and_metrics_json(invoke, sets, tmp_path):
    run, real = sets
    result = invoke("evaluate", run, "--real", real, "--features", "tiny")
    assert result.exit_code == 0, result.output
    assert "12 synthetic tile(s) against 24 real tile(s)" in result.output
    for name in ("FID", "KID ×10³", "precision (k 3)", "recall (k 3)", "density (k 5)",
                 "coverage (k 5)", "NND synth → real", "CMMD", "cosine to the source tile"):
        assert f"| {name}" in result.output
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["feature_space"]["name"] == "tiny"
    assert doc["feature_space"]["comparable_with_published"] is False
    assert len(doc["feature_space"]["weights_sha256"]) == 64
    assert doc["counts"] == {"synthetic": 12, "real": 24, "pairs": 12}
    values = {m["metric"]: m for m in doc["metrics"]}
    assert values["FID"]["value"] > 0 and 0 <= values["precision (k 3)"]["value"] <= 1
    # 12 synthetic tiles: subsets of 6 would give a meaningless spread, so no ±
    assert values["KID ×10³"]["pm"] is None and "no ±" in values["KID ×10³"]["note"]
    assert "donor" in doc["pairs"]
    # the cache: a second evaluation embeds nothing new and gives the same numbers
    cache = list((tmp_path / "cache" / "features").glob("tiny-*.npz"))
    assert len(cache) == 1
    before = cache[0].stat().st_mtime_ns
    again = invoke("evaluate", run, "--real", real, "--features", "tiny")
    assert again.exit_code == 0
    assert cache[0].stat().st_mtime_ns == before
    assert json.loads((run / "metrics.json").read_text())["metrics"] == doc["metrics"]


def test_the_own_donor_is_left_out_of_the_nearest_neighbours(sets):
    """Copies of real tiles as 'inpainted' ones: with their own donors excluded, NND
    synth → real is no longer ~0."""
    from histosynth.workflows.evaluate import evaluate

    run, real = sets
    copies = run.parent / "copies"
    _write(copies, "inpainting", 6, 0, donors=[f"vessel-{n}" for n in range(6)])
    rows = {r.metric: r.value for r in evaluate(copies, real, features="tiny").rows}
    # the same pixels (blurred) but their donor is excluded: distance is to other tiles
    assert rows["NND synth → real (cosine)"] > 1e-4


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("no-synthetic", "no synthetic tiles"),
        ("no-real", "no real (extracted) tiles"),
        ("size", "the metrics compare tiles of one size"),
        ("unreadable", "cannot read or decode the image"),
        ("features", "unknown feature space"),
    ],
)
def test_bad_input_is_one_line(invoke, sets, tmp_path, change, match):
    run, real = sets
    args = ["evaluate", run, "--real", real, "--features", "tiny"]
    if change == "no-synthetic":
        args[1] = real
    elif change == "no-real":
        args[3] = run
    elif change == "size":
        path = real / "images" / "ext-0003.png"
        cv2.imwrite(str(path), np.zeros((32, 32, 3), np.uint8))
    elif change == "unreadable":
        (run / "images" / "inp-0002.png").write_bytes(b"not a png")
    elif change == "features":
        args[-1] = "nonsense"
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("histosynth: error")]
    assert len(errors) == 1 and match in errors[0], result.stderr


def test_max_images_samples_each_side_and_per_class_adds_groups(invoke, sets):
    run, real = sets
    result = invoke("evaluate", run, "--real", real, "--features", "tiny", "--max-images", 8,
                    "--per-class")
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["counts"]["synthetic"] == 8 and doc["counts"]["real"] == 8
    assert {m["group"] for m in doc["metrics"]} == {"all", "Vessel"}
    assert "[Vessel]" in result.output


def test_several_feature_spaces_in_one_evaluation(invoke, sets, tmp_path, monkeypatch):
    """``--features tiny,clip,cmmd``: each metric is measured in each space (FID in CLIP
    features is CLIP-FID; ``cmmd`` names CLIP ViT-L/14-336, found offline)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    run, real = sets
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=16)
    for name in ("clip", "clip-l14-336"):
        CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "weights" / name)
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "weights"))
    result = invoke("evaluate", run, "--real", real, "--features", "tiny,clip,cmmd,tiny")
    assert result.exit_code == 0, result.output + result.stderr
    doc = json.loads((run / "metrics.json").read_text())
    assert [s["name"] for s in doc["feature_spaces"]] == ["tiny", "clip", "clip-l14-336"]
    assert doc["feature_space"] == doc["feature_spaces"][0]
    by_space = {}
    for row in doc["metrics"]:
        by_space.setdefault(row["space"], {})[row["metric"]] = row["value"]
    assert set(by_space) == {"tiny", "clip", "clip-l14-336"}
    assert all(rows["FID"] > 0 for rows in by_space.values())
    assert by_space["clip"]["FID"] != by_space["tiny"]["FID"]
    assert "| FID | clip |" in result.output and "| CMMD | clip-l14-336 |" in result.output
    assert doc["plots"]["space"] == "tiny"
    unknown = invoke("evaluate", run, "--real", real, "--features", "tiny,inceptoin")
    assert unknown.exit_code == 1 and "unknown feature space 'inceptoin'" in unknown.stderr


def test_every_metric_has_its_row_even_when_too_few_tiles_measure_it(
    invoke, tmp_path, monkeypatch
):
    """Four synthetic tiles: density and coverage (k 5) cannot be measured, and their rows
    say what they need instead of being left out."""
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))
    real, run = tmp_path / "real", tmp_path / "run"
    _write(real, "extracted", 10, 0)
    _write(run, "inpainting", 4, 5000, donors=[f"vessel-{n}" for n in range(4)])
    result = invoke("evaluate", run, "--real", real, "--features", "tiny")
    assert result.exit_code == 0, result.output
    for name in ("density (k 5)", "coverage (k 5)"):
        assert f"| {name} | tiny | n/a  (needs ≥ 6 tiles per side)" in result.output
    values = {m["metric"]: m for m in json.loads((run / "metrics.json").read_text())["metrics"]}
    assert values["density (k 5)"]["value"] is None
