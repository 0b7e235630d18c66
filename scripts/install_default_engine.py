"""Install a trained engine folder as the embedded default (preset ``default``).

    python scripts/train_default_engine.py --out DIR
    python scripts/bench_seam.py --models DIR DIR:ddim tiny --out seam.json
    python scripts/install_default_engine.py DIR [--bench seam.json] [--sampler NAME]
                                             [--strength TAU] [--generator GEN
                                             --generation gen.json]

Copies the components of ``DIR`` (``transformer/``, ``vae/``, ``encoder/``, ``scheduler/``)
into ``synthesis/embedded/histosynth_mini_512/`` (replacing what is there), marks the
engine as preset ``default``, and writes its ``MODEL_CARD.md`` from the run's
``training.json`` (with the seam benchmark of ``--bench`` and the model's limits) and
``loss_curves.png``; the preview is kept as JPEG. ``--generator GEN`` (the ``--out`` of
``train_default_engine.py --generator-from``) adds its companion generator when
``--generation`` (``scripts/bench_generation.py --json`` of the engine with it) says it
ships: then the engine declares ``generates: true``. The card says what the engine
serves either way. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "synthesis" / "embedded" / "histosynth_mini_512"
PARTS = ("transformer", "vae", "encoder", "scheduler")


def _trainer():
    spec = importlib.util.spec_from_file_location(
        "train_default_engine", Path(__file__).parent / "train_default_engine.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kept(strength: float) -> float:
    """√ᾱ at t = ⌊τ · 1000⌋ of the linear β schedule 0.0001–0.02: how much of the composite
    the noised latent keeps."""
    import numpy as np

    betas = np.linspace(1e-4, 0.02, 1000)
    return float(np.sqrt(np.cumprod(1 - betas)[int(strength * 1000)]))


def bench_section(bench: dict, names: dict[str, str]) -> str:
    """The model card's seam-benchmark table from ``scripts/bench_seam.py --out`` JSON,
    each method label's ``names`` keys replaced by their values."""
    steps = bench["steps"]
    steps = "/".join(map(str, steps)) if isinstance(steps, list) else steps
    lines = [
        "## Seam benchmark (held out)",
        "",
        f"`python scripts/bench_seam.py` on {bench['samples']} held-out {bench['tile']}² tiles "
        "(TIAToolbox sample rows 500–999) with a vessel-shaped donor pasted in with an "
        f"imperfect colour match; the seam band (±2σ, σ = {bench['sigma']:g} px) regenerated "
        "at τ = "
        + ", ".join(
            "each engine's own" if t is None else f"{t:g}" for t in bench.get("strengths", [0.55])
        )
        + ", "
        f"{steps} steps, on the CPU. ΔE: mean CIELAB ΔE of the band to "
        "the composite; HF ratio: the band's high-frequency energy over the composite's "
        "(1 = as sharp, blur → 0, noise ≫ 1); KID ×10³ of 48² seam crops against real "
        "held-out crops in a fixed random-convolution feature space (real vs real: "
        f"{1000 * bench['kid_real_vs_real']:.2f}).",
        "",
        "| method | ΔE (band) | HF ratio | KID ×10³ | ms / tile |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in bench["rows"]:
        method = row["method"]
        for old, new in names.items():
            method = method.replace(old, new)
        lines.append(
            f"| {method} | {row['delta_e']:.2f} | {row['hf_ratio']:.2f} | "
            f"{1000 * row['kid']:.2f} | {row['ms_per_tile']:.0f} |"
        )
    return "\n".join(lines) + "\n"


STRENGTH = """## Default strength

This engine regenerates a seam at τ = {strength:g} unless `--strength` names another
(`histosynth_engine.json`'s `strength`), not at PixCell's 0.55. With its linear β schedule
(PixArt's, 0.0001–0.02) τ = 0.55 keeps √ᾱ = 0.21 of the composite, so almost all of the
band is redrawn and it drifts from the composite's colour (ΔE above 5 in the table
above); τ = {strength:g} keeps √ᾱ = {keep:.2f} and still redraws the band's fine texture.
"""

def _generated_by(generation: dict) -> str:
    if not generation["generator"]:
        return "variations by its seam denoiser"
    if generation["ships"]:
        return "variations by its generator"
    steps = generation.get("generator_steps", "?")
    return f"variations by a companion generator ({steps} steps; not shipped)"


def serves_section(meta: dict, generation: dict | None) -> str:
    """The model card's "What it serves" section: its abilities, and the generation
    benchmark of ``scripts/bench_generation.py`` when one was run."""
    abilities = meta.get("abilities") or {}
    low, high = (abilities.get("timesteps") or [0, 1000])[:2]
    lines = [
        "## What it serves",
        "",
        f"- Seam regeneration (inpainting) at τ ≤ {high / 1000:g}: its seam denoiser learnt "
        f"timesteps {low}–{high - 1} (`histosynth_engine.json` `abilities`); a larger "
        "`--strength` is refused.",
    ]
    if abilities.get("generates"):
        lines.append(
            "- Generation from noise (`--mode variation`, synthetic backgrounds) with its "
            "companion generator (`generator/`: the denoiser fine-tuned over all 1000 "
            "timesteps)."
        )
    else:
        lines.append(
            "- **Not** generation from noise: from pure noise its denoiser draws speckle, "
            "not tissue, so `--mode variation` and `--background synthetic` are refused "
            "with one line, and `--background auto` skips a donor that fits no real tile."
        )
    if generation:
        k = generation["kid_x1000"]
        lines += [
            "",
            f"Generation benchmark (`python scripts/bench_generation.py`, "
            f"{generation['tiles']} variations of held-out tiles at {generation['steps']} "
            f"steps, {generation['hardware']}; KID ×10³ against the other half of the held-out "
            "tiles, in this engine's own encoder):",
            "",
            "| tiles | KID ×10³ | content check passed |",
            "|---|---:|---:|",
            f"| {_generated_by(generation)} | {k['generated_vs_B'][0]:.2f} ± "
            f"{k['generated_vs_B'][1]:.2f} | "
            f"{generation['content_check_pass']:.0%} |",
            f"| held-out real tiles | {k['real_A_vs_B'][0]:.2f} ± {k['real_A_vs_B'][1]:.2f} | |",
            f"| held-out real tiles blurred (σ 2 px) | {k['blurred_A_vs_B']:.2f} | |",
            "",
            f"The bar to ship generation: every tile passes the content check and KID ≤ "
            f"{generation['kid_bar_x1000']:.2f} (3 × the real-vs-real value or its ±); "
            + ("met." if generation["ships"] else "not met, so this engine does not generate."),
        ]
    return "\n".join(lines) + "\n"


LIMITS = """## Limits

- Trained on one 1000² H&E image (plus two small ones for the autoencoder): it knows that
  tissue's stain and cell types, at 0.5 µm/px. Other stains and tissues are out of domain.
- The conditioning encoder is a fixed projection of colour / texture statistics, not a
  pathology foundation model: it steers colour and texture, not morphology.
- Inside the seam band (±2σ of the pasted region's edge, where the method regenerates)
  the tissue is redrawn, softer than real tissue (the HF ratio above) and different pixel
  by pixel from the composite (the ΔE above, against the round trip through the
  autoencoder alone as its floor). Lower τ (`--strength`) keeps more of the composite.
  The vessel is pasted with a 2σ ring of its own tissue, so its wall lies off the seam.
- On this benchmark the weight-free multiband harmoniser (`--harmonise multiband`) keeps
  the composite's colour and texture better than this engine's diffusion, in
  milliseconds: for CPU runs of many tiles, prefer it.
- For production data use PixCell-1024 (`histosynth models check pixcell-1024`).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="engine folder written by train_default_engine")
    parser.add_argument("--bench", type=Path, help="scripts/bench_seam.py --out JSON")
    parser.add_argument("--sampler", help="the engine's default sampler (else the run's)")
    parser.add_argument(
        "--strength", type=float, help="the engine's default τ, in (0, 1] (else the run's)"
    )
    parser.add_argument("--generator", type=Path, help="train_default_engine --generator-from OUT")
    parser.add_argument("--generation", type=Path, help="scripts/bench_generation.py --json")
    args = parser.parse_args(argv)
    generation = (
        json.loads(args.generation.read_text(encoding="utf-8")) if args.generation else None
    )
    if args.generator is not None and not (generation and generation.get("ships")):
        parser.error("--generator needs --generation JSON whose tiles pass the bar (ships)")
    src: Path = args.run
    for part in PARTS:
        if not (src / part).is_dir():
            parser.error(f"{src / part} is missing: not an engine folder")
    trainer = _trainer()
    report = json.loads((src / "training.json").read_text(encoding="utf-8"))
    meta = json.loads((src / "histosynth_engine.json").read_text(encoding="utf-8"))
    meta["preset"] = "default"
    if args.sampler:
        meta["sampler"] = args.sampler
    if args.strength is not None:
        if not 0 < args.strength <= 1:
            parser.error(f"--strength must be in (0, 1], not {args.strength}")
        meta["strength"] = args.strength
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for part in PARTS:
        shutil.copytree(src / part, TARGET / part)
    if args.generator is not None:
        shutil.copytree(args.generator / "generator", TARGET / "generator")
        meta.setdefault("abilities", {})["generates"] = True
    shutil.copy(src / "training.json", TARGET / "training.json")
    (TARGET / "histosynth_engine.json").write_text(json.dumps(meta, indent=2) + "\n")
    card = (src / "MODEL_CARD.md").read_text(encoding="utf-8")
    n_train = int(re.search(r"\((\d+) tiles of", card).group(1))
    n_val = int(re.search(r"\((\d+) tiles for the denoiser", card).group(1))
    trainer.plot_loss_curves(report, TARGET / "loss_curves.png")
    text = trainer.model_card(report, meta["model_id"], n_train, n_val)
    if args.bench:
        bench = json.loads(args.bench.read_text(encoding="utf-8"))
        # the engine was benchmarked as its folder, or as "default" once installed
        names = {f"{src} engine": "this engine", "default engine": "this engine"}
        text += "\n" + bench_section(bench, names)
    text += "\n" + STRENGTH.format(
        strength=meta.get("strength", 0.55), keep=_kept(meta.get("strength", 0.55))
    )
    text += "\n" + serves_section(meta, generation)
    text += "\n" + LIMITS
    (TARGET / "MODEL_CARD.md").write_text(text, encoding="utf-8")
    preview = next((p for p in (src / "preview.jpg", src / "preview.png") if p.exists()), None)
    if preview is not None:
        cv2.imwrite(
            str(TARGET / "preview.jpg"), cv2.imread(str(preview)), [cv2.IMWRITE_JPEG_QUALITY, 85]
        )
    from histosynth.synthesis.config_limits import record_weight_hashes

    record_weight_hashes(TARGET)  # last: the weights are final now (loads verify them)
    for path in TARGET.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    size = sum(p.stat().st_size for p in TARGET.rglob("*") if p.is_file()) / 1e6
    print(f"installed {src} as preset default in {TARGET} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
