"""The UNTRAINED tiny engine is flagged wherever its tiles appear: the review gallery
(a banner), the export (a warning and the ``engine_trained`` column) and the Python API
(an ``UntrainedEngineWarning``); tiles it did not paint (multiband seams) are not."""

from __future__ import annotations

import csv

import pytest

from histosynth.synthesis.engine import load_engine
from histosynth.synthesis.errors import UntrainedEngineWarning


@pytest.fixture(scope="module")
def runs(invoke, tmp_path_factory, demo_project):
    root = tmp_path_factory.mktemp("flags")
    project = demo_project
    out = {}
    for harmonise in ("diffusion", "multiband"):
        run = root / harmonise
        result = invoke(
            "synthesize",
            "--project",
            project,
            "--class",
            "Vessel",
            "--count",
            1,
            "--model",
            "tiny",
            "--tile-size",
            256,
            "--steps",
            2,
            "--harmonise",
            harmonise,
            "--allow-untrained",  # let it paint the seams: what this module flags
            "--out",
            run,
        )
        assert result.exit_code == 0, result.output
        assert "UntrainedEngineWarning" not in result.stderr  # the CLI says it in words
        out[harmonise] = run
    return out


def _export(invoke, run, tmp_path):
    result = invoke(
        "export", run, "--out", tmp_path / "export", "--include-pending", "--include-qc-failed"
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "export" / "train" / "metadata.csv", newline="") as handle:
        return result, list(csv.DictReader(handle))


def test_gallery_and_export_flag_tiles_of_the_untrained_engine(invoke, runs, tmp_path):
    run = runs["diffusion"]
    assert invoke("review", "gallery", run).exit_code == 0
    page = (run / "review.html").read_text()
    assert 'class="untrained"' in page and "UNTRAINED engine" in page
    result, rows = _export(invoke, run, tmp_path)
    assert [r["engine_trained"] for r in rows] == ["false"]
    assert "UNTRAINED engine" in result.stderr


def test_multiband_tiles_are_not_flagged(invoke, runs, tmp_path):
    run = runs["multiband"]
    assert invoke("review", "gallery", run).exit_code == 0
    assert 'class="untrained"' not in (run / "review.html").read_text()
    result, rows = _export(invoke, run, tmp_path)
    assert [r["engine_trained"] for r in rows] == [""]
    assert "UNTRAINED" not in result.stderr


def test_the_python_api_warns():
    with pytest.warns(UntrainedEngineWarning, match="UNTRAINED"):
        load_engine("tiny")
