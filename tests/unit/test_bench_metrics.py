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
    result = bench.main(["--n", "60", "--dim", "8", "--out", str(tmp_path / "b.json")])
    names = [row["metric"].split(" ")[0] for row in result["rows"]]
    assert names == ["frechet_distance", "kid", "precision_recall", "density_coverage", "nnd",
                     "cmmd", "manifold_metrics:"]
    combined = result["rows"][-1]
    precision, recall, *_ = combined["value"]
    assert 0 <= precision <= 1 and 0 <= recall <= 1 and combined["baseline_seconds"] > 0
    assert (tmp_path / "b.json").is_file() and "| all |" in capsys.readouterr().out
