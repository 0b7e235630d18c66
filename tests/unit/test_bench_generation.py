"""scripts/bench_generation.py at a tiny size: the untrained engine's variations are
scored, fail the content check, and do not clear the bar for shipping generation."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_generation.py"


def test_the_untrained_engine_does_not_ship_generation(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("bench_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_generation"] = module
    spec.loader.exec_module(module)
    out = tmp_path / "gen.json"
    report = module.main(["--model", "tiny", "--tiles", "2", "--steps", "2", "--backgrounds",
                          "1", "--json", str(out), "--sheet", str(tmp_path / "gen.png")])
    assert json.loads(out.read_text()) == report
    assert report["real_tiles"] == [32, 32] and report["tiles"] == 2
    assert report["content_check_pass"] == 0 and report["ships"] is False
    assert report["kid_x1000"]["generated_vs_B"][0] > report["kid_bar_x1000"]
    assert (tmp_path / "gen.png").stat().st_size > 0
