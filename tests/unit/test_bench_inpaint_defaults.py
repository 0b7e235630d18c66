"""scripts/bench_inpaint_defaults.py runs and compares the two configurations (no timing
asserted: its numbers belong in the issue note)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inpaint_defaults.py"


def test_the_bench_times_both_configurations(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_inpaint_defaults", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--samples", "1", "--model", "tiny"])
    assert result["before_s"] > 0 and result["now_s"] > 0
    assert result["ratio"] == result["before_s"] / result["now_s"]
    out = capsys.readouterr().out
    assert "| before: 50 steps, guidance 2.5, whole tile decoded |" in out
    assert "ratio before / now" in out
