"""scripts/bench_metrics.py runs at a tiny size and reports every metric (no timing
asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_metrics.py"


def test_bench_metrics_at_a_tiny_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_metrics", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(
        ["--n", "60", "--dim", "8", "--compare-n", "40", "--out", str(tmp_path / "b.json")]
    )
    names = [row["metric"].split(" ")[0] for row in result["rows"]]
    assert names == ["frechet_distance", "kid", "pairwise_metrics", "pairwise_metrics"]
    full, compared = result["rows"][2], result["rows"][3]
    assert 0 <= full["value"].precision <= 1 and 0 <= full["value"].recall <= 1
    assert compared["baseline_seconds"] > 0 and not compared["in_metric_step"]
    assert result["metric_step_seconds"] == sum(r["seconds"] for r in result["rows"][:3])
    out = capsys.readouterr().out
    assert (tmp_path / "b.json").is_file() and "| all of the metric step (n 60) |" in out
