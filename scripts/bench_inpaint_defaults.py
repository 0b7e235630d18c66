"""How long does the embedded default engine take to inpaint one 512² tile on the CPU, at
its own defaults against the defaults it ran at before (issue 27)?

Both configurations regenerate the seams of the same held-out composites of
``scripts/bench_seam.py`` in one run, in this process: **before** — 50 steps of the full
schedule, guidance 2.5 (an unconditional pass every step) and the whole tile decoded;
**now** — the engine's own ``histosynth_engine.json`` steps and guidance and only the
latent window around the seam band decoded (``decode="band"``). Prints the median
seconds per tile of each and their ratio. Target: ≤ 2 s a tile on two CPU cores.

    python scripts/bench_inpaint_defaults.py [--samples 6] [--model default]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

SEAM_BENCH = Path(__file__).resolve().with_name("bench_seam.py")


def _samples(count: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("bench_seam", SEAM_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.samples(count)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    from histosynth.synthesis.engine import load_engine

    engine = load_engine(args.model, device="cpu", tile_size=512 if args.model == "tiny" else None)
    pipe = engine.inpaint_pipeline()
    pipe.set_progress_bar_config(disable=True)
    data = _samples(args.samples)
    pipe(data[0]["composite"], data[0]["mask"], seeds=[0])  # warm up

    def seconds(**options) -> float:
        times = []
        for sample in data:
            start = time.perf_counter()
            pipe(sample["composite"], sample["mask"], seeds=[0], seam_sigma=15.0, **options)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    before = seconds(num_inference_steps=50, guidance_scale=2.5, decode="tile")
    now = seconds()
    own = engine.sampling
    print(f"{engine.model_id}: {len(data)} held-out {engine.tile_size}² tiles, τ "
          f"{engine.strength:g}, {torch.get_num_threads()} CPU threads")
    print("| configuration | s / tile |\n|---|---:|")
    print(f"| before: 50 steps, guidance 2.5, whole tile decoded | {before:.2f} |")
    print(f"| now: {own.inpaint_steps} steps, guidance {own.inpaint_guidance:g}, seam band "
          f"decoded | {now:.2f} |")
    print(f"ratio before / now = {before / now:.2f}")
    return {"before_s": before, "now_s": now, "ratio": before / now}


if __name__ == "__main__":
    main()
