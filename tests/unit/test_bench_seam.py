"""scripts/bench_seam.py runs and its metrics mean what they say (no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_seam.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_seam", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_seam"] = module
    spec.loader.exec_module(module)
    return module


def test_baselines_table_and_metric_anchors(bench, tmp_path, capsys):
    result = bench.main(["--models", "--samples", "2", "--out", str(tmp_path / "s.json")])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {
        "cv2.inpaint (Telea)",
        "cv2.seamlessClone",
        "multiband (histosynth)",
        "composite (none)",
        "reference: other real tissue in the band",
        "reference: composite ≥ 4 px + real finer detail",
    }
    # keeping the composite's structure down to 4 px scores far better than other tissue
    assert (rows["reference: composite ≥ 4 px + real finer detail"]["delta_e"]
            < rows["reference: other real tissue in the band"]["delta_e"] / 1.5)
    none = rows["composite (none)"]
    assert none["delta_e"] == 0 and none["hf_ratio"] == pytest.approx(1.0)
    assert rows["cv2.inpaint (Telea)"]["hf_ratio"] < 0.5  # diffusion fill blurs the band
    assert rows["multiband (histosynth)"]["hf_ratio"] > 0.5
    assert (tmp_path / "s.json").is_file()
    assert "| multiband (histosynth) |" in capsys.readouterr().out


def test_kid_is_near_zero_for_one_distribution_and_large_for_another(bench):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    assert abs(bench.kid(a, b)) < 0.05 < bench.kid(a, b + 1.0)


def test_engine_row_blends_the_generated_band_once(bench):
    """The pipeline's images are already X_final; blending them again would shrink A to A²
    and flatter ΔE (an earlier version did)."""
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.inpaint.seam import seam_blend, seam_weights

    run = bench.diffusion("tiny", 2)
    (s,) = bench.samples(1)
    out = run(s)
    pipe = load_engine("tiny", device="cpu", tile_size=bench.TILE).inpaint_pipeline()
    pipe.set_progress_bar_config(disable=True)
    generated = pipe(
        s["composite"],
        s["mask"],
        strength=0.55,
        num_inference_steps=2,
        seeds=[0],
        seam_sigma=bench.SIGMA,
    ).generated[0]
    once = seam_blend(s["composite"], generated, seam_weights(s["mask"], bench.SIGMA))
    np.testing.assert_array_equal(out, once)


def test_every_method_is_measured_on_the_unaltered_sample(bench, monkeypatch):
    """cv2.seamlessClone writes into its mask: each method gets its own copy, so the rows
    after it (and their bands) see the sample as made."""
    seen = []

    def spy(s):
        seen.append(s["mask"].copy())
        return s["composite"]

    monkeypatch.setattr(bench, "composite_only", spy)
    (first,) = bench.samples(1)
    bench.main(["--models", "--samples", "1"])
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], first["mask"])
