"""End to end: ``synthesize --harmonise multiband|none`` on a real demo project.

The seam-only property holds in every mode: beyond 4σ of the seam the tile equals the
composite it started from, bit for bit; ``none`` is the composite itself.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from histosynth.cli import main
from histosynth.integration.dataset import read_index
from histosynth.synthesis.inpaint.seam import SEAM_CUTOFF

SIGMA = 15.0  # the default seam width


def _run(project, out, mode):
    result = CliRunner().invoke(
        main,
        [
            "synthesize",
            "--project",
            str(project),
            "--class",
            "Vessel",
            "--count",
            "2",
            "--model",
            "tiny",
            "--tile-size",
            "256",
            "--harmonise",
            mode,
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return read_index(out)


def _png(path, colour=True):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR if colour else cv2.IMREAD_GRAYSCALE)
    return image


@pytest.mark.parametrize("mode", ["multiband", "none"])
def test_the_seam_is_the_only_change(demo_project, tmp_path, mode):
    rows = _run(demo_project, tmp_path / mode, mode)
    assert len(rows) == 2
    for row in rows:
        assert row["harmonise"] == mode and row["steps"] == "" and row["strength"] == ""
        run = tmp_path / mode
        image = _png(run / row["image_path"])
        comp = _png(run / "refs" / f"{row['id']}-composite.png")
        placed = _png(run / "refs" / f"{row['id']}-donor-mask.png", colour=False)
        if mode == "none":
            assert np.array_equal(image, comp)
            continue
        # the placed mask in tile pixels: where the composite differs from the background
        background = _png(run / "refs" / f"{row['id']}-background.png")
        inside = (np.abs(comp.astype(int) - background).sum(-1) > 0).astype(np.uint8)
        assert placed.any() and inside.any()
        d = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5) + cv2.distanceTransform(
            inside, cv2.DIST_L2, 5
        )
        far = d > SEAM_CUTOFF * SIGMA + 2
        assert np.array_equal(image[far], comp[far])
        assert (image != comp).any()


def test_an_unknown_harmoniser_is_a_usage_error(demo_project, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "synthesize",
            "--project",
            str(demo_project),
            "--class",
            "Vessel",
            "--harmonise",
            "poisson",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2 and not (tmp_path / "x").exists()


def test_the_demo_harmonises_without_the_untrained_engine_and_says_so(tmp_path):
    result = CliRunner().invoke(
        main,
        ["demo", "--out", str(tmp_path), "--count", "1", "--model", "tiny", "--tile-size", "256"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "UNTRAINED: seams are harmonised by multiband blending" in result.output
    assert "these tiles show the workflow" not in result.output
    assert [row["harmonise"] for row in read_index(tmp_path / "run")] == ["multiband"]


def test_auto_follows_the_seam_mode_the_engine_records(demo_project, tmp_path):
    """``--harmonise auto`` takes the engine's recorded ``harmonise`` (its evidence), not
    the trained engine's diffusion; naming a mode still wins."""
    import json

    from histosynth.synthesis.engine import ENGINE_FILE, save_engine, tiny_engine

    folder = save_engine(tiny_engine(256, device="cpu"), tmp_path / "engine")
    meta = json.loads((folder / ENGINE_FILE).read_text())
    assert "harmonise" not in meta
    (folder / ENGINE_FILE).write_text(json.dumps({**meta, "trained": True, "harmonise": "none"}))
    runs = {}
    for mode in ("auto", "multiband"):
        out = tmp_path / mode
        result = CliRunner().invoke(
            main,
            ["synthesize", "--project", str(demo_project), "--class", "Vessel", "--count", "1",
             "--model", str(folder), "--tile-size", "256", "--harmonise", mode, "--out",
             str(out)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        [row] = read_index(out)
        runs[mode] = (row, _png(out / row["image_path"]),
                      _png(out / "refs" / f"{row['id']}-composite.png"))
    row, image, composite = runs["auto"]
    assert row["harmonise"] == "none" and np.array_equal(image, composite)
    row, image, composite = runs["multiband"]
    assert row["harmonise"] == "multiband" and not np.array_equal(image, composite)
