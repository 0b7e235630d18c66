"""scripts/bench_train.py: the cumulative training ablation, a CPU smoke run of the tiny size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"
NAMES = ["baseline", "cache", "kv", "attention", "compile"]


@pytest.fixture(scope="module")
def bench():
    name = "histosynth_bench_train"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def test_plans_are_cumulative(bench) -> None:
    """Each configuration keeps what the one before turned on and adds one thing."""
    plans = bench.plans("xformers", "fp16")
    assert [p.name for p in plans] == [*NAMES, "controlnet"]
    controlnet = plans.pop()  # the ControlNet row: the attention row's settings, eager
    assert (controlnet.cached, controlnet.kv, controlnet.attention, controlnet.compiled) == (
        True, 2, "xformers", False)
    assert controlnet.controlnet == 7 and all(p.controlnet == 0 for p in plans)
    assert [(p.cached, p.kv, p.attention, p.mixed_precision, p.compiled) for p in plans] == [
        (False, 1, "sdpa", "no", False),
        (True, 1, "sdpa", "no", False),
        (True, 2, "sdpa", "no", False),
        (True, 2, "xformers", "fp16", False),
        (True, 2, "xformers", "fp16", True),
    ]


def test_he_tiles_are_distinct_real_pixels(bench) -> None:
    """Crops below 1000 px, reflect padding above; masks are 0 / 255."""
    small = bench.he_tiles(256, 5)
    assert all(t.shape == (256, 256, 3) and t.dtype == np.uint8 for t, _ in small)
    assert len({t.tobytes() for t, _ in small}) == 5
    big = bench.he_tiles(1024, 9)  # one padded crop × 8 rotations / flips, then again
    assert all(t.shape == (1024, 1024, 3) for t, _ in big)
    assert len({t.tobytes() for t, _ in big}) == 8
    assert np.array_equal(big[0][0], big[8][0])
    assert all(set(np.unique(m)) <= {0, 255} and m.shape == (1024, 1024) for _, m in big)


def test_ratios_goal_and_table_without_a_gpu(bench) -> None:
    """Ratios are to the baseline of the run; the GPU goal is judged on the last measured
    row only at the real size on CUDA; a failed row stays in the table with its status."""
    plans = bench.plans("xformers", "fp16")[:5]
    speeds = [0.5, 0.6, 0.7, None, 6.5]
    rows = []
    for plan, speed in zip(plans, speeds, strict=True):
        row = {"name": plan.name, "label": plan.label, "data": "cache" if plan.cached else
               "on-the-fly", "kv": plan.kv, "attention": plan.attention,
               "mixed_precision": plan.mixed_precision, "compiled": plan.compiled,
               "peak_gb": 40.0}
        row.update({"status": "ok", "images_per_s": speed} if speed else {"status": "OOM"})
        rows.append(row)
    bench.add_ratios(rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(1.2)
    assert rows[2]["ratio_previous"] == pytest.approx(0.7 / 0.6)
    assert "ratio" not in rows[3] and "ratio_previous" not in rows[4]
    assert rows[4]["ratio"] == pytest.approx(13.0)

    goal = bench.goal_check(rows, "cuda:0", "pixcell-1024", 1024)
    assert goal["evaluated"] and goal["ratio_met"] and not goal["images_per_s_met"]
    assert not goal["met"] and goal["all_five_configurations"]
    assert not bench.goal_check(rows, "cpu", "tiny", 256)["evaluated"]
    no_baseline = [{k: v for k, v in r.items() if k != "ratio"} for r in rows[1:]]
    bench.add_ratios(no_baseline)
    assert not bench.goal_check(no_baseline, "cuda", "pixcell-1024", 1024)["evaluated"]

    table = bench.table_lines(rows)
    assert len(table) == 2 + len(rows) and len({len(line) for line in table}) == 1
    assert "OOM" in table[2 + 3] and "40.00 GB" in table[2]


def test_cpu_quick_run_prints_the_table(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    result = bench.main(["--device", "cpu", "--size", "tiny", "--quick", "--out", str(out),
                         "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out

    rows = result["rows"]
    assert [r["name"] for r in rows] == [*NAMES, "controlnet"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["ratio"] > 0
        assert row["timed_steps"] == result["steps"] and row["batch_size"] == result["batch_size"]
        assert row["loss_finite"]
        assert "peak_rss_delta_mb" in row  # the CPU's memory figure
    assert rows[0]["ratio"] == 1.0 and rows[0]["data"] == "on-the-fly"
    assert all(r["data"] == "cache" for r in rows[1:])
    assert rows[3]["mixed_precision"] == "bf16" and rows[4]["compiled"]
    assert result["goal"]["evaluated"] is False  # the goal is for the real size on a GPU
    assert result["cache"]["samples"] == result["tiles"]
    assert json.loads(out.read_text())["rows"][0]["ratio"] == 1.0

    table = [line for line in printed.splitlines() if line.startswith("| ")]
    labels = [r["label"] for r in rows]
    assert len(table) == 2 + len(NAMES)  # the header and one line per configuration
    assert [next(lab for lab in labels if line.startswith(f"| {lab} ")) for line in table[1:]] \
        == labels
    assert "bf16" in printed and "fp16 autocast is not supported" in printed
    assert "not comparable" in printed
    assert "goal" in printed and "not evaluated" in printed
