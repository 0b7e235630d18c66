"""Does an engine generate H&E tissue from noise? Variations of held-out real tiles, scored.

    python scripts/bench_generation.py [--model default|DIR] [--tiles 56] [--steps 20]
        [--json gen.json] [--sheet gen.png]

Real tiles: 512² crops of the held-out rows 500–999 of TIAToolbox's H&E sample (padded
to 512 rows by reflection, as the default engine's training does), in the 8 flips /
rotations, split by crop position into two halves A and B. Generated tiles: ``--tiles``
variations conditioned on the tiles of A in turn (seeds 0 …, ``--steps``, the variation
guidance), and ``--backgrounds`` synthetic backgrounds (16 turned copies of a quarter
crop). Printed and written:

- KID (×10³, unbiased, cubic kernel) in ``histosynth evaluate``'s default feature space
  (the embedded engine's encoder, mean of its rows; the tiny engine's for ``tiny``):
  generated vs B, real A vs B (the real-vs-real value), and as a scale, A blurred
  (Gaussian σ 2 px) vs B;
- the content check (``histosynth.integration.content_check``) calibrated on A: the share
  of generated tiles that pass and the commonest reasons;
- seconds per tile.

A model that cannot generate is run anyway (its refusal is bypassed on purpose, to
measure what it would make); ``--sheet`` writes a contact sheet of references and their
variations. Issue 24's bar for shipping generation in the default engine: every tile
passes the content check and KID(generated, B) ≤ 3 × max(KID(A, B), its ± over subsets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch


def real_halves(tile: int = 512) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out crops of TIAToolbox's sample in 8 symmetries, split by crop position."""
    from histosynth.integration.demo.data import he_source_image

    held = he_source_image()[500:]
    pad = cv2.copyMakeBorder(held, 0, max(0, tile - held.shape[0]), 0, 0, cv2.BORDER_REFLECT_101)
    xs = np.linspace(0, pad.shape[1] - tile, 8).round().astype(int)
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for i, x in enumerate(xs):
        base = np.ascontiguousarray(pad[:tile, x : x + tile])
        for k in range(8):
            image = np.rot90(base[:, ::-1] if k >= 4 else base, k % 4)
            halves[i % 2].append(np.ascontiguousarray(image))
    return halves


def kid_x1000(space, a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """KID ×10³ of two tile sets (all samples) and its sd over 10 half-size subsets."""
    from histosynth.synthesis.metrics import kid

    fa, fb = space(np.stack(a)), space(np.stack(b))
    whole = kid(fb, fa).mean * 1e3
    n = max(2, min(len(a), len(b)) // 2)
    spread = kid(fb, fa, subsets=10, subset_size=n, seed=0).std or 0.0
    return float(whole), float(spread * 1e3)


def _kind(reason: str) -> str:
    """A content-check reason without its numbers (``H&E gamut``, ``(noise)`` …)."""
    for kind in ("H&E gamut", "(noise)", "(blur)", "colour outliers", "mask on tissue"):
        if kind in reason:
            return kind.strip("()")
    return reason


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="preset or engine folder")
    parser.add_argument("--tiles", type=int, default=56, help="variations generated (≥ 50)")
    parser.add_argument("--backgrounds", type=int, default=4, help="synthetic backgrounds")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sheet", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from histosynth.integration.content_check import calibrate, check_tile
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.metrics.features import load_feature_space
    from histosynth.synthesis.pipelines.background import synthetic_condition_tile
    from histosynth.synthesis.pipelines.variation import VariationPipeline

    engine = load_engine(args.model, device="cpu")
    tile = engine.tile_size
    real_a, real_b = real_halves(tile)
    # built directly: the engine's own variation_pipeline() refuses a non-generating engine
    pipe = VariationPipeline(
        transformer=engine.transformer if engine.generator is None else engine.generator,
        vae=engine.vae,
        scheduler=engine.make_scheduler(),
        encoder=engine.encoder,
    )
    pipe.set_progress_bar_config(disable=True)
    generated, references = [], []
    t0 = time.perf_counter()
    for i in range(args.tiles):
        reference = real_a[i % len(real_a)]
        out = pipe(reference, seeds=[i], num_inference_steps=args.steps)
        generated.append(out.images[0])
        references.append(reference)
    per_tile = (time.perf_counter() - t0) / max(1, args.tiles)
    backgrounds = []
    rng = np.random.default_rng(0)
    for i in range(args.backgrounds):
        crop = real_a[i][: tile // 4, : tile // 4]
        condition = synthetic_condition_tile(crop, rng, grid=4)
        rows = engine.encoder.encode(condition)
        backgrounds.append(
            pipe(uni_rows=rows, seeds=[1000 + i], num_inference_steps=args.steps).images[0]
        )

    # evaluate's default space: the embedded engine's encoder (tiny: its own)
    space = load_feature_space("tiny" if engine.preset == "tiny" else "default", "cpu")
    blurred = [cv2.GaussianBlur(t, (0, 0), 2.0) for t in real_a]
    kid_gen, sd_gen = kid_x1000(space, generated, real_b)
    kid_real, sd_real = kid_x1000(space, real_a, real_b)
    kid_blur, _ = kid_x1000(space, blurred, real_b)
    thresholds = calibrate(real_a)
    verdicts = [check_tile(g, thresholds, source=r) for g, r in zip(generated, references,
                                                                     strict=True)]
    bg_verdicts = [check_tile(b, thresholds, source=real_a[i][: tile // 4, : tile // 4])
                   for i, b in enumerate(backgrounds)]
    reasons = Counter(_kind(r) for v in verdicts + bg_verdicts for r in v.reasons)
    bar = 3 * max(kid_real, sd_real)
    report = {
        "model": engine.model_id,
        "generator": engine.generator is not None,
        "tiles": args.tiles,
        "steps": args.steps,
        "real_tiles": [len(real_a), len(real_b)],
        "kid_x1000": {"generated_vs_B": [kid_gen, sd_gen], "real_A_vs_B": [kid_real, sd_real],
                      "blurred_A_vs_B": kid_blur},
        "kid_bar_x1000": bar,
        "content_check_pass": sum(v.passed for v in verdicts) / len(verdicts),
        "background_pass": sum(v.passed for v in bg_verdicts) / max(1, len(bg_verdicts)),
        "reasons": dict(reasons.most_common()),
        "seconds_per_tile": per_tile,
        "ships": bool(all(v.passed for v in verdicts + bg_verdicts) and kid_gen <= bar),
        "hardware": f"{torch.get_num_threads()} CPU threads",
    }
    print(f"model {report['model']} (generator: {report['generator']}), {args.tiles} "
          f"variations at {args.steps} steps, {per_tile:.1f} s per tile")
    print("| tiles | KID ×10³ vs real B |")
    print("|---|---:|")
    print(f"| generated variations | {kid_gen:.2f} ± {sd_gen:.2f} |")
    print(f"| real A (held out) | {kid_real:.2f} ± {sd_real:.2f} |")
    print(f"| real A blurred σ 2 px | {kid_blur:.2f} |")
    print(f"content check: {report['content_check_pass']:.0%} of variations pass, "
          f"{report['background_pass']:.0%} of synthetic backgrounds; reasons {dict(reasons)}")
    print(f"bar: KID ≤ {bar:.2f} and every tile passes → ships: {report['ships']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.sheet:
        blank = np.full_like(real_a[0], 255)
        rows = [references[:4], generated[:4], (backgrounds + generated[4:8])[:4]]
        sheet = np.concatenate(
            [np.concatenate([*row, *[blank] * (4 - len(row))], axis=1) for row in rows], axis=0
        )[::2, ::2]
        cv2.imwrite(str(args.sheet), cv2.cvtColor(np.ascontiguousarray(sheet), cv2.COLOR_RGB2BGR))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
