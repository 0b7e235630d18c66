"""scripts/chaos.py runs end to end at a tiny size and its counts mean what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"


def test_chaos_at_a_tiny_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    out = tmp_path / "chaos.json"
    result = chaos.main(["--renames", "2", "--timed-kills", "1", "--races", "1",
                         "--fuzz", "40", "--out", str(out)])
    assert result["kills"] + result["finished before a timed kill"] == 3
    assert result["clean resumes"] == result["kills"] >= 2
    assert result["races"] == 1 and result["both runs intact"] == 1
    assert result["fuzz cases"] == 80 and result["crashes"] == 0
    assert out.is_file() and "| clean resumes |" in capsys.readouterr().out
