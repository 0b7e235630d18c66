"""scripts/bench_engine.py: the analytic FLOP count and a CPU smoke run of the table."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analytic_flops_match_torch_flop_counter(bench) -> None:
    """The analytic count equals torch's FlopCounterMode on the real config and on a small
    one, with and without KV-compression, also on a non-square grid with odd sides."""
    real = bench.PIXCELL_1024_CONFIG
    small = {**real, "num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 32,
             "cross_attention_dim": 64, "caption_channels": 32, "sample_size": 32}
    cases = [(real, 1024, 1024, 1), (real, 1024, 1024, 2), (small, 208, 336, 2),
             (small, 256, 512, 1)]
    for config, height, width, kv in cases:
        analytic = bench.transformer_flops(config, height, width, kv_ratio=kv)
        counted = bench.measured_transformer_flops(config, height, width, kv_ratio=kv)
        assert math.isclose(analytic, counted, rel_tol=1e-9), (height, width, kv)
    # the numbers engine-facts.md quotes: ≈6.4 TFLOP at 1024², ≈13 % / ≈33 % saved by R=2
    off = bench.transformer_flops(real, 1024, 1024)
    assert 6.3e12 < off < 6.5e12
    saving = 1 - bench.transformer_flops(real, 1024, 1024, kv_ratio=2) / off
    assert 0.12 < saving < 0.14
    saving_4096 = 1 - bench.transformer_flops(real, 4096, 4096, 2) / bench.transformer_flops(
        real, 4096, 4096
    )
    assert 0.32 < saving_4096 < 0.35
    # explicit blocks: none compressed costs the same as off
    assert bench.transformer_flops(real, 1024, 1024, kv_ratio=2, kv_blocks=()) == off


def test_cpu_smoke_run_prints_the_table(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    result = bench.main(["--device", "cpu", "--quick", "--steps", "2", "--out", str(out),
                         "--sections", "forward,e2e,attention,compile"])
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "no CUDA device: running the tiny preset on the CPU" in printed
    assert "not comparable" in printed
    assert "flops" not in result  # the FLOP section is the test above

    rows = result["rows"]
    forward = {(r["batch"], r["resolution"], r["kv"]) for r in rows
               if r["kind"] == "forward" and not r["compiled"] and r["status"] == "ok"}
    assert forward == {(1, 256, 1), (2, 256, 1), (1, 256, 2), (2, 256, 2)}
    e2e = [r for r in rows if r["kind"] == "e2e" and r["status"] == "ok"]
    assert {(r["batch"], r["kv"]) for r in e2e} == {(1, 1), (2, 1), (1, 2), (2, 2)}
    assert all(r["images_per_s"] > 0 and r["steps"] == 2 for r in e2e)
    assert {r["batch"] for r in rows if r["kind"] == "vae_decode" and r["status"] == "ok"} == {
        1, 2}
    assert any(r["compiled"] and r["status"] == "skipped (CPU)" for r in rows
               if r["kind"] == "forward")
    assert "KV R=2 / off forward time at 256², batch 2" in result["ratios"]
    assert "KV R=2 / off forward time at 256², batch 2" in printed
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])
