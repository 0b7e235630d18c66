"""scripts/bench_scale.py at a tiny size: one process and 1 / 2 Ray workers on a local
cluster make the same number of tiles and the table has every ratio (no timing
asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is the [ray] extra")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_scale.py"


def test_bench_scale_at_a_tiny_size(tmp_path, capsys):
    import ray

    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scale.json"
    result = bench.main(
        ["--model", "tiny", "--count", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]
    )
    names = [row["executor"] for row in result["rows"]]
    assert names == ["single process", "ray, 1 worker(s)", "ray, 2 worker(s)"]
    assert [row["tiles"] for row in result["rows"]] == [2, 2, 2]
    assert result["rows"][1]["vs_one_worker"] == pytest.approx(1.0)
    assert all(row["vs_single"] > 0 for row in result["rows"])
    stages = result["rows"][0]["stages"]
    assert (
        stages["rendering (the engine)"] > 0 and stages["writing (PNG, GeoJSON, index commit)"] > 0
    )
    assert sum(stages.values()) == pytest.approx(result["rows"][0]["seconds"])
    assert out.is_file() and "| ray, 2 worker(s) | 2 |" in capsys.readouterr().out
    assert not ray.is_initialized()  # the script stops the Ray it started
