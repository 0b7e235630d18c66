"""Measure: do ControlNet-generated vessels follow their outlines better than the base alone?

    python scripts/controlnet_adherence.py [--controlnet NAME|FOLDER] [--slides 2]
        [--strengths 0,0.55] [--seeds 0,1,2] [--card FOLDER] [--workdir DIR]

On held-out demo slides (seeds 200, 201, …: neither ``histosynth demo``'s nor the
ControlNet's training slides), every drawn outline (``Vessel sketch``) is generated with
the embedded engine as ``synthesize --mode shape --shapes drawn`` does:

Every run regenerates its seam by diffusion (``--harmonise diffusion``, whatever the
engine's ``auto`` picks), so the rows differ only in the inside and the ControlNet:

* ``warped donors (base, τ 0)``: the donor warped into the outline, kept inside;
* ``base, τ T``: the inside regenerated at τ T by the base alone (``--controlnet none``);
* ``ControlNet, τ T``: the inside regenerated at τ T with the ControlNet (mask guidance
  ``--mask-guidance``).

``histosynth evaluate --mask-adherence`` then segments every tile with one segmenter
(trained once on the real vessel tiles of the same slides, ``histosynth extract``, then
reused with ``--segmenter``) and compares its vessel with the target outline: mean IoU per
run, over every outline and ``--seeds`` seed. Each ControlNet row is also compared with
the base at the same τ tile by tile (the same outline, donor and seed): the mean paired
difference with a bootstrap 95 % interval (2000 resamples of the tiles, seeded) and the
tiles it wins, loses and ties — the tiles' spread is mostly the outlines', which a paired
comparison cancels. τ at or below the engine's seam τ (0.35 for the embedded default)
regenerates the inside at the seam's τ (the larger of the two), so such rows repeat it.
Prints a table; ``--card FOLDER`` records it in the ControlNet folder's
``training.json``, re-writes its ``MODEL_CARD.md`` and records the best ControlNet row's
τ and mask guidance as the ControlNet's own defaults (``generation`` in its metadata,
what ``synthesize`` uses when ``--inside-strength`` / ``--mask-guidance`` are not given).
Not a unit test: it takes minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def histosynth(*args: str) -> None:
    print("$ histosynth " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "histosynth", *args], check=True)


def mean_iou(run: Path) -> tuple[float, int]:
    """Mean IoU over the run's measured tiles and their number (``adherence.json``)."""
    data = json.loads((run / "adherence.json").read_text())
    values = [t["iou"] for t in data["tiles"].values()]
    return sum(values) / len(values), len(values)


def tile_ious(run: Path) -> dict[str, float]:
    """IoU per tile id of a run (``adherence.json``)."""
    data = json.loads((run / "adherence.json").read_text())
    return {tile: float(t["iou"]) for tile, t in data["tiles"].items()}


def paired(ours: list[float], base: list[float], seed: int = 0) -> dict[str, Any]:
    """Mean of ``ours − base`` (tile by tile), its bootstrap 95 % interval, wins/losses/ties."""
    import numpy as np

    diff = np.asarray(ours, float) - np.asarray(base, float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (2000, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": round(float(diff.mean()), 4), "ci95": [round(float(low), 4),
            round(float(high), 4)], "wins": int((diff > 1e-6).sum()),
            "losses": int((diff < -1e-6).sum()), "ties": int((np.abs(diff) <= 1e-6).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--controlnet", default=None, help="[the engine's own]")
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--strengths", default="0,0.55")
    parser.add_argument("--seeds", default="0,1,2", help="each outline once per seed")
    parser.add_argument("--mask-guidance", default="2.0")
    parser.add_argument("--segmenter-epochs", default="12")
    parser.add_argument("--segmenter-arch", default="unet", help="smp architecture (CPU-sized)")
    parser.add_argument("--segmenter-encoder", default="resnet18")
    parser.add_argument("--card", type=Path, help="ControlNet folder whose card to update")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    from histosynth.integration.demo.data import build_demo_project, build_demo_slide

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        project = work / "project" / "project.qpproj"
        if not project.exists():
            slides = [
                build_demo_slide(work / "project" / "slides" / f"held-{k}.ome.tif", seed=200 + k)
                for k in range(args.slides)
            ]
            project = build_demo_project(work / "project", slide=slides)
        real = work / "real"
        if not real.exists():
            histosynth("extract", "--project", str(project), "--class", "Vessel",
                       "--tile-size", "512", "--out", str(real))
        controlnet = ["--controlnet", args.controlnet] if args.controlnet else []
        runs: dict[str, list[str]] = {}
        for strength in args.strengths.split(","):
            name = "warped donors (base, τ 0)" if float(strength) == 0 else f"base, τ {strength}"
            runs[name] = ["--controlnet", "none", "--inside-strength", strength]
        for strength in args.strengths.split(","):
            runs[f"ControlNet, τ {strength}"] = [
                *controlnet, "--inside-strength", strength,
                "--mask-guidance", args.mask_guidance,
            ]
        segmenter = work / "segmenter.pt"
        rows: list[dict[str, Any]] = []
        per_tile: dict[str, dict[str, float]] = {}
        for name, extra in runs.items():
            began, ious = time.perf_counter(), {}
            for seed in args.seeds.split(","):
                out = work / "".join(c if c.isalnum() or c in ".-" else "-" for c in name)
                out = out.with_name(f"{out.name}--seed-{seed}")
                if not (out / "index.csv").exists():
                    histosynth("synthesize", "--project", str(project), "--class", "Vessel",
                               "--mode", "shape", "--shapes", "drawn", "--model", args.model,
                               "--harmonise", "diffusion", "--seed", seed, "--out", str(out),
                               *extra)
                if segmenter.exists():
                    histosynth("evaluate", str(out), "--mask-adherence", "--segmenter",
                               str(segmenter), "--features", "default")
                else:
                    histosynth("evaluate", str(out), "--real", str(real), "--mask-adherence",
                               "--save-segmenter", str(segmenter), "--segmenter-epochs",
                               args.segmenter_epochs, "--segmenter-arch", args.segmenter_arch,
                               "--segmenter-encoder", args.segmenter_encoder,
                               "--features", "default")
                ious.update({f"{seed}/{k}": v for k, v in tile_ious(out).items()})
            per_tile[name] = ious
            iou = sum(ious.values()) / len(ious)
            strength = float(extra[extra.index("--inside-strength") + 1])
            row = {"name": name, "adherence": round(iou, 4), "tiles": len(ious),
                   "seconds": round(time.perf_counter() - began, 1),
                   "controlnet": "none" not in extra, "inside_strength": strength}
            base_name = ("warped donors (base, τ 0)" if strength == 0
                         else f"base, τ {extra[extra.index('--inside-strength') + 1]}")
            if row["controlnet"] and base_name in per_tile:
                keys = sorted(ious)
                row["vs_base"] = paired([ious[k] for k in keys],
                                        [per_tile[base_name][k] for k in keys])
            rows.append(row)
            print(f"{name}: mean IoU {iou:.3f} over {len(ious)} tiles"
                  + (f"; paired Δ vs base {row['vs_base']}" if "vs_base" in row else ""),
                  flush=True)

    print(f"\nmask adherence (mean IoU), {args.model}, {os.cpu_count()} CPU cores")
    print(f"{'generation':22}{'IoU':>7}{'tiles':>7}")
    for row in rows:
        print(f"{row['name']:22}{row['adherence']:7.3f}{row['tiles']:7d}")
    if args.card:
        report_file = args.card / "training.json"
        report = json.loads(report_file.read_text())
        report["adherence"] = {
            "command": "python scripts/controlnet_adherence.py " + " ".join(sys.argv[1:]),
            "tiles": rows[0]["tiles"],
            "outlines": rows[0]["tiles"] // len(args.seeds.split(",")),
            "seeds": len(args.seeds.split(",")),
            "rows": rows,
        }
        best = max((r for r in rows if r["controlnet"]), key=lambda r: r["adherence"])
        report["adherence"]["best"] = best["name"]
        report_file.write_text(json.dumps(report, indent=2) + "\n")
        meta_file = args.card / "histosynth_controlnet.json"
        meta = json.loads(meta_file.read_text())
        meta["generation"] = {"inside_strength": best["inside_strength"],
                              "mask_guidance": float(args.mask_guidance)}
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        spec = importlib.util.spec_from_file_location(
            "train_embedded_controlnet", HERE / "train_embedded_controlnet.py"
        )
        trainer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(trainer)
        (args.card / "MODEL_CARD.md").write_text(trainer.model_card(report))
        print(f"recorded in {args.card}")


if __name__ == "__main__":
    main()
