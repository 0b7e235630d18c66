"""Every mode × every engine that runs here: refused with one clear line, or written with
tiles that pass the content check — never garbage with exit code 0.

Modes: inpaint into real backgrounds, inpaint into synthetic backgrounds, variation.
Engines: the embedded ``default`` (trained on seam timesteps only) and the UNTRAINED
``tiny``. The pixels are looked at here too, not only the ``qc`` column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from histosynth.common.geometry import TileGeometry
from histosynth.integration.content_check import QC_PASS, calibrate, check_tile
from histosynth.integration.errors import InputError

STEPS = "3"
# engine → mode → the refusal's words, or None: written, and every tile passes
EXPECTED: dict[str, dict[str, list[str] | None]] = {
    "default": {
        "inpaint": None,  # multiband: the engine's recorded evidence (docs/evidence.md)
        "inpaint-diffusion": None,
        "synthetic": ["engine 'default' cannot make synthetic backgrounds", "--background real"],
        "variation": ["engine 'default' cannot make --mode variation", "--mode inpaint"],
    },
    "tiny": {
        "inpaint": None,  # harmonised by multiband: the untrained engine paints nothing
        "inpaint-diffusion": ["engine 'tiny' is UNTRAINED", "--allow-untrained"],
        "synthetic": ["engine 'tiny' is UNTRAINED", "--background synthetic", "--allow-untrained"],
        "variation": ["engine 'tiny' is UNTRAINED", "--mode variation", "--allow-untrained"],
    },
}
MODE_ARGS = {
    "inpaint": ["--mode", "inpaint", "--background", "real"],
    "inpaint-diffusion": ["--mode", "inpaint", "--background", "real", "--harmonise", "diffusion"],
    "synthetic": ["--mode", "inpaint", "--background", "synthetic"],
    "variation": ["--mode", "variation"],
}


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "index.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("engine", sorted(EXPECTED))
@pytest.mark.parametrize("mode", sorted(MODE_ARGS))
def test_each_combination_refuses_or_writes_passing_tiles(
    engine, mode, demo_project, tmp_path, invoke
) -> None:
    run = tmp_path / "run"
    args = ["synthesize", "--project", demo_project, "--class", "Vessel", "--count", "2",
            "--model", engine, "--steps", STEPS, "--out", run, *MODE_ARGS[mode]]
    result = invoke(*args)
    refusal = EXPECTED[engine][mode]
    if refusal is not None:
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert len(line.splitlines()) == 1, line
        for word in refusal:
            assert word in line
        assert not run.exists(), "a refused run wrote something"
        return
    assert result.exit_code == 0, result.output
    assert "FAILED the content check" not in result.output
    rows = _rows(run)
    assert rows
    # calibrated on the real backgrounds of this run's slides (as the run does)
    backgrounds = [_rgb(run / "refs" / f"{r['id']}-background.png") for r in rows]
    thresholds = calibrate(backgrounds)
    for row, background in zip(rows, backgrounds, strict=True):
        assert row["qc"] == QC_PASS, row["qc"]
        image = _rgb(run / row["image_path"])
        mask = cv2.imread(str(run / row["mask_path"]), cv2.IMREAD_GRAYSCALE)
        assert check_tile(image, thresholds, source=background).passed
        # what the eye checks: pink / purple tissue (CIELAB a* > 0) outside the vessel
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(float)
        assert lab[..., 1][mask == 0].mean() > 133
        assert mask.any()  # the placed donor's mask
    thresholds_used = json.loads((run / "run.json").read_text())["content_check"]
    assert thresholds_used["real_tiles"] >= 1


def test_untrained_generation_is_written_only_when_asked_and_then_fails_the_check(
    demo_project, tmp_path, invoke
) -> None:
    run = tmp_path / "var"
    result = invoke("synthesize", "--project", demo_project, "--class", "Vessel", "--count",
                    "2", "--model", "tiny", "--mode", "variation", "--steps", STEPS,
                    "--allow-untrained", "--strict-qc", "--out", run)
    assert result.exit_code == 1  # --strict-qc
    assert "2 of the 2 tile(s) written FAILED the content check" in result.output
    rows = _rows(run)
    assert [r["qc"].startswith("fail: ") for r in rows] == [True, True]
    # a variation row carries its class, no mask (its pixels were generated, not placed)
    for row in rows:
        assert row["mask_source"] == "none" and row["mask_path"] == ""
        assert row["class_name"].startswith("Vessel")
        assert not (run / "masks" / f"{row['id']}.png").exists()
        assert (run / "refs" / f"{row['id']}-reference-mask.png").is_file()
        geojson = (run / row["annotation_path"]).read_text()
        assert '"features":[]' in geojson.replace(" ", "")
    # a failed tile never enters the user's QuPath project
    from histosynth.integration.qupath.writeback import write_run_to_project

    before = demo_project.read_bytes()
    written = write_run_to_project(demo_project, run)
    assert not written.added and len(written.skipped) == 2
    assert "2 failed the content check" in written.summary()
    assert demo_project.read_bytes() == before
    # resuming keeps the rows (an empty mask_path is this row's own, not a spoiled one)
    again = invoke("synthesize", "--project", demo_project, "--class", "Vessel", "--count",
                   "2", "--model", "tiny", "--mode", "variation", "--steps", STEPS,
                   "--allow-untrained", "--resume", "--out", run)
    assert again.exit_code == 0, again.output
    assert "0 synthetic tile(s) written, 2 already present" in again.output


def test_auto_backgrounds_never_generate_with_an_engine_that_cannot(demo_project) -> None:
    """A donor that fits no real background is skipped with the reason, not pasted onto
    noise (the tile plan of every executor)."""
    from histosynth.integration.tiles import collect_donors, load_sources
    from histosynth.workflows.synthesize import SynthesisSettings
    from histosynth.workflows.synthesize.tile_plan import compose_tile

    sources = load_sources(project=demo_project)
    donors = collect_donors(sources, ("Vessel",), TileGeometry(512, 0.5), [], context_px=30)
    run = SynthesisSettings(("Vessel",), 1, model="histosynth-mini-512", tile_size=512,
                            generate_backgrounds=False)
    skipped = compose_tile(0, donors[0], [], [], run, engine=None)
    assert "generates no synthetic background" in skipped.reason
    assert "histosynth-mini-512" in skipped.reason


def test_the_tiatoolbox_engine_refuses_before_reading_a_slide(tmp_path) -> None:
    from histosynth.tiatoolbox import SynthesisEngine

    missing = tmp_path / "no-such-slide.svs"  # never opened: the refusal comes first
    with pytest.raises(InputError, match="cannot make --mode variation"):
        SynthesisEngine("default").run([missing], annotations=[tmp_path / "a.geojson"],
                                       classes="Vessel", count=1, mode="variation",
                                       save_dir=tmp_path / "out")
    with pytest.raises(InputError, match="UNTRAINED"):
        SynthesisEngine("tiny").run([missing], annotations=[tmp_path / "a.geojson"],
                                    classes="Vessel", count=1, mode="variation",
                                    save_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("harmonise", ["multiband", "none"])
def test_real_donors_in_real_backgrounds_pass_with_every_harmoniser(
    harmonise, demo_project, tmp_path, invoke
) -> None:
    """(diffusion: the default engine's inpaint case above.)"""
    run = tmp_path / "run"
    result = invoke("synthesize", "--project", demo_project, "--class", "Vessel", "--count",
                    "3", "--background", "real", "--harmonise", harmonise, "--out", run)
    assert result.exit_code == 0, result.output
    rows = _rows(run)
    assert len(rows) == 3 and {r["harmonise"] for r in rows} == {harmonise}
    assert [r["qc"] for r in rows] == [QC_PASS] * 3
