"""`histosynth demo` with no model named: the embedded default engine names itself and
recommends PixCell-1024; `--harmonise auto` blends its seams by multiband, as the engine's
recorded evidence picks (docs/evidence.md), and says so; asked to (`--harmonise
diffusion`) it regenerates them as H&E-coloured tissue (not the green/red noise of the
untrained engine)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from histosynth.cli import main


def _demo(out: Path, *extra: str):
    args = ["demo", "--out", str(out), "--count", "1", "--steps", "4", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _seam_band(mask: np.ndarray, half_width: int = 30) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * half_width + 1,) * 2)
    return (cv2.dilate(mask, kernel) > 0) & (cv2.erode(mask, kernel) == 0)


def _seam_stats(run: Path) -> tuple[float, float]:
    """(fraction of green pixels — CIELAB a* < 0 — in the seam band, band HF energy over the
    HF energy of the tissue far from every vessel)."""
    (row,) = list(csv.DictReader((run / "index.csv").open(encoding="utf-8")))
    image = cv2.cvtColor(cv2.imread(str(run / row["image_path"])), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(run / row["mask_path"]), cv2.IMREAD_GRAYSCALE)
    band = _seam_band(mask)
    green = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 1] < 128  # a* < 0
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    detail = (grey - cv2.GaussianBlur(grey, (0, 0), 1.5)) ** 2
    far = cv2.dilate(mask, np.ones((121, 121), np.uint8)) == 0
    return float(green[band].mean()), float(detail[band].mean() / detail[far].mean())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("default-demo")
    default = _demo(root / "default", "--harmonise", "diffusion")
    tiny = _demo(root / "tiny", "--model", "tiny", "--harmonise", "diffusion", "--allow-untrained")
    return root, default, tiny


def test_auto_blends_the_default_engines_seams_as_its_evidence_picks(tmp_path) -> None:
    result = _demo(tmp_path / "auto")
    assert result.exit_code == 0, result.output
    assert "engine: histosynth-mini-512" in result.output
    assert "seams: multiband, what this engine's evidence picks" in result.output
    (row,) = list(csv.DictReader((tmp_path / "auto" / "run" / "index.csv").open()))
    assert (row["model"], row["harmonise"], row["strength"]) == (
        "histosynth-mini-512", "multiband", "")


def test_the_demo_uses_the_embedded_default_by_diffusion_and_says_so(runs) -> None:
    root, result, _ = runs
    assert result.exit_code == 0, result.output
    assert "engine: histosynth-mini-512" in result.output
    assert "for production use PixCell-1024" in result.output
    assert "UNTRAINED" not in result.output
    (row,) = list(csv.DictReader((root / "default" / "run" / "index.csv").open()))
    assert (row["model"], row["harmonise"], row["tile_size"]) == (
        "histosynth-mini-512", "diffusion", "512")
    # its own τ (histosynth_engine.json), not PixCell's 0.55; the tiny engine keeps 0.55
    assert float(row["strength"]) == 0.35
    (tiny_row,) = list(csv.DictReader((root / "tiny" / "run" / "index.csv").open()))
    assert float(tiny_row["strength"]) == 0.55


def test_its_seams_are_h_and_e_tissue_where_the_untrained_engine_makes_noise(runs) -> None:
    root, _, tiny = runs
    assert tiny.exit_code == 0, tiny.output
    green, detail = _seam_stats(root / "default" / "run")
    tiny_green, _ = _seam_stats(root / "tiny" / "run")
    assert green < 0.005, green  # H&E has no green (measured: 1e-5)
    assert 0.3 < detail < 2.0, detail  # about as much fine detail as the tissue around it
    assert tiny_green > 0.03, tiny_green  # the untrained engine's noise (measured: 0.12)
