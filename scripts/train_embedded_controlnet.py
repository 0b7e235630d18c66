"""Train the embedded engine's vessel-mask ControlNet on the CPU, on the demo world's vessels.

    python scripts/train_embedded_controlnet.py [--out DIR] [--minutes 50] [--quick] [--resume]

Stages (each a histosynth command, so the script is what a user would run):

1. the training world: a QuPath project of ``--slides`` demo slides (seeds 100, 101, …;
   never the seeds of ``histosynth demo`` (0–2) or of the held-out outlines of
   ``scripts/controlnet_adherence.py`` (200+)), built by
   :func:`histosynth.integration.demo.data.build_demo_project`;
2. ``histosynth cache build --project … --class Vessel --tile-size 768`` with the embedded
   engine: one 768 px tile per vessel (0.5 µm/px) and ``--background-tiles`` tissue tiles
   without one, so training reads random 512 px windows (vessels off centre, and tiles with
   no vessel that train "no vessel here");
3. ``histosynth train controlnet --base default`` in chunks of ``--chunk`` steps (constant
   learning rate, so ``--steps`` may grow on ``--resume``) until ``--minutes`` are spent
   or ``--steps`` are done, on the timesteps the embedded denoiser learnt (< 560);
4. the ControlNet folder written to ``--out`` with float16 weights (the engine's are
   float16 too), ``training.json`` (settings, held-out loss per checkpoint, seconds) and
   ``MODEL_CARD.md``. The adherence section of the card is filled in by
   ``scripts/controlnet_adherence.py --card OUT``.

``--quick`` runs every stage at toy sizes (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NAME = "histosynth-mini-512-vessels"
REPOSITORY = Path(__file__).resolve().parents[1]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def histosynth(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "histosynth", *args]
    log("$ histosynth " + " ".join(args))
    subprocess.run(command, check=True, env={**os.environ, **(env or {})})


def build_world(folder: Path, slides: int, quick: bool) -> Path:
    """The training project (``folder/project.qpproj``), built unless present."""
    from histosynth.integration.demo.data import build_demo_project, build_demo_slide

    project = folder / "project.qpproj"
    if project.exists():
        return project
    size = {"width": 1024, "height": 768} if quick else {}
    made = [
        build_demo_slide(folder / "slides" / f"train-{k:02d}.ome.tif", seed=100 + k, **size)
        for k in range(slides)
    ]
    return build_demo_project(folder, slide=made)


def trained_steps(work: Path) -> int:
    log_file = work / "train" / "metrics.jsonl"
    if not log_file.exists():
        return 0
    lines = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in lines), default=0)


def halve(folder: Path) -> None:
    """float16 weights in place, and their new sha256 in the metadata."""
    from safetensors.torch import load_file, save_file

    from histosynth.common.files import file_sha256
    from histosynth.synthesis.controlnet_library import METADATA_FILE, WEIGHTS_FILE

    weights = folder / WEIGHTS_FILE
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["weights_sha256"] = file_sha256(weights)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _paired_cells(row: dict[str, Any]) -> str:
    pair = row.get("vs_base")
    if not pair:
        return " | "
    low, high = pair["ci95"]
    return (f"{pair['mean']:+.3f} [{low:+.3f}, {high:+.3f}] | "
            f"{pair['wins']} / {pair['losses']} / {pair['ties']}")


def model_card(report: dict[str, Any]) -> str:
    """MODEL_CARD.md from the training report (and its adherence section, when measured)."""
    meta, p = report["metadata"], report["params"]
    metrics = meta["metrics"]
    adherence = report.get("adherence")
    lines = [
        f"# {NAME}: the embedded engine's vessel-mask ControlNet",
        "",
        "A ControlNet (histosynth `PixCellControlNet`) for the embedded engine "
        "`histosynth-mini-512`, trained by `scripts/train_embedded_controlnet.py` on the CPU. "
        "Use it with `histosynth synthesize --mode shape --controlnet "
        "models/histosynth-mini-512-vessels`.",
        "",
        "## Model",
        f"- {meta['layers']} of the base's 4 blocks copied, zero-initialised projections; the "
        "mask enters through a small learned conv encoder (512 px → the 128² latent grid).",
        f"- base: `{meta['base_id']}`, transformer weight hash `{meta['base_hash'][:16]}…`; "
        f"tiles {meta['resolution']} px at 0.5 µm/px; float16 weights.",
        "",
        "## Data",
        f"- {p['slides']} demo slides (seeds 100–{100 + p['slides'] - 1}), built from "
        "TIAToolbox's H&E sample with painted vessels (`histosynth.integration.demo`); "
        f"one 768 px tile per vessel plus {p['background_tiles']} tiles without vessels; "
        "random 512 px windows at training time.",
        f"- {meta['training']['train_samples']} training / {meta['training']['val_samples']} "
        f"held-out tiles; cache content hash `{meta['training_data_checksum'][:16]}…`.",
        "",
        "## Training",
        f"- {meta['training']['steps_run']} steps of batch {p['batch_size']}, AdamW lr "
        f"{p['lr']}, timesteps 0–559 (the denoiser's), UNI-row dropout "
        f"{meta['training']['uncond_prob']}, mask dropout {meta['training']['mask_dropout']}, "
        f"loss weight {meta['training'].get('mask_loss_weight', 1.0):g} on the latent cells a "
        "vessel touches; "
        f"{report['seconds'] / 60:.1f} minutes on {report['machine']}.",
        f"- held-out ε-loss with the masks: {metrics.get('val_loss_initial', float('nan')):.4f}"
        f" (step 0, the base alone) → {metrics['val_loss']:.4f}; with the null mask "
        f"{metrics.get('val_loss_null_mask', float('nan')):.4f}.",
        "",
        "## Mask adherence (held-out outlines)",
    ]
    if adherence:
        lines += [
            f"Measured by `{adherence['command']}`: IoU of a vessel segmenter's mask against "
            "the target outline (the shape issue's metric), on "
            f"{adherence['tiles']} tiles: {adherence['outlines']} held-out outlines (demo "
            f"slides of seeds 200+) × {adherence.get('seeds', 1)} seed(s). Paired: the "
            "ControlNet tile minus the base tile of the same outline, donor, seed and τ "
            "(bootstrap 95 % interval):",
            "",
            "| generation | mask adherence | paired Δ vs base [95 % CI] | wins / losses / ties |",
            "|---|---|---|---|",
            *[f"| {row['name']} | {row['adherence']:.3f} | {_paired_cells(row)} |"
              for row in adherence["rows"]],
        ]
    else:
        lines.append("Not measured yet: run `scripts/controlnet_adherence.py --card OUT`.")
    lines += [
        "",
        "## Limits",
        "- Trained on one H&E source (TIAToolbox's sample) and painted vessels: a demo and CPU "
        "model, not for production; train your own with `histosynth train controlnet`.",
        "- The embedded denoiser serves strengths ≤ 0.55, so the ControlNet steers the inside "
        "of an outline re-generated from the warped donor; it cannot make a whole tile.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPOSITORY / "models" / NAME)
    parser.add_argument("--work-dir", type=Path, help="project, cache, checkpoints (OUT-work)")
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--background-tiles", type=int, default=24)
    parser.add_argument("--minutes", type=float, default=50.0, help="training wall-time cap")
    parser.add_argument("--steps", type=int, default=4000, help="at most this many steps")
    parser.add_argument("--chunk", type=int, default=100, help="steps per resumed chunk")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mask-loss-weight", type=float, default=1.0,
                        help="train controlnet --mask-loss-weight")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="toy sizes (tests)")
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.slides, args.background_tiles, args.steps, args.chunk = 1, 2, 4, 2
        args.layers, args.batch_size = 1, 2
    work = args.work_dir or args.out.with_name(args.out.name + "-work")
    if work.exists() and not args.resume:
        parser.error(f"{work} exists; pass --resume to continue from it")
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    project = build_world(work / "project", args.slides, args.quick)
    cache = work / "vessels.h5"
    if not cache.exists():
        histosynth(
            "cache", "build", "--project", str(project), "--class", "Vessel",
            "--model", "default", "--out", str(cache), "--tile-size", "768",
            "--background-tiles", str(args.background_tiles), "--device", "cpu",
        )
    library = work / "library"
    env = {"HISTOSYNTH_CONTROLNETS": str(library)}
    train_began, done = time.perf_counter(), trained_steps(work)
    while done < args.steps:
        target = min(args.steps, done + args.chunk)
        histosynth(
            "train", "controlnet", "--cache", str(cache), "--base", "default",
            "--name", NAME, "--layers", str(args.layers), "--steps", str(target),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--timesteps", "0", "560", "--checkpoint-every", str(args.chunk),
            "--mask-loss-weight", str(args.mask_loss_weight),
            "--sample-every", "0" if args.quick else str(4 * args.chunk),
            "--val-fraction", "0.1", "--work-dir", str(work / "train"),
            "--device", "cpu", "--overwrite", *(["--resume"] if done else []),
            env=env,
        )
        done = trained_steps(work)
        spent = (time.perf_counter() - train_began) / 60
        per_chunk = spent / max(1.0, done / args.chunk)
        log(f"{done} steps, {spent:.1f} min")
        if args.minutes and spent + per_chunk > args.minutes:
            break
    folder = library / NAME
    measured = None
    if (args.out / "training.json").exists():  # keep a measured adherence across re-runs
        measured = json.loads((args.out / "training.json").read_text()).get("adherence")
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(folder, args.out)
    halve(args.out)
    metadata = json.loads((args.out / "histosynth_controlnet.json").read_text())
    history = [
        json.loads(x)
        for x in (work / "train" / "metrics.jsonl").read_text().splitlines()
        if x.strip()
    ]
    report = {
        "params": {
            "slides": args.slides,
            "background_tiles": args.background_tiles,
            "layers": args.layers,
            "mask_loss_weight": args.mask_loss_weight,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "quick": args.quick,
        },
        "metadata": metadata,
        "validation": [r for r in history if "val_loss" in r],
        "seconds": round(time.perf_counter() - began, 1),
        "machine": f"{os.cpu_count()} CPU cores",
    }
    if measured:
        report["adherence"] = measured
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(report))
    log(f"wrote {args.out}: held-out loss {metadata['metrics'].get('val_loss')}")
    return report


if __name__ == "__main__":
    main()
