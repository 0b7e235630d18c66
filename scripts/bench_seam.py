"""How well does each method regenerate an inpainting seam? (issue: trained default engine)

On held-out H&E (the bottom half of TIAToolbox's 1000² sample, which the default engine
does not train on), each sample is a 512² tile O with a vessel-shaped ellipse E filled
with a donor D (another held-out crop, its colour shifted the way an imperfect colour
transfer leaves it): the composite X = O outside E, D inside — the input every method
gets. The seam band is the ring within 2σ of E's edge (≈ 4σ wide, σ = 15 px, as the
inpainting seam blend). Each method regenerates the band; then, over the band only:

* ΔE — mean CIELAB ΔE (CIE76) to X's own pixels there (colour kept: lower is better);
* HF ratio — high-frequency energy (grey − Gaussian(σ = 1.5 px)) of the result over that
  of X (1 = as sharp as real tissue; blur → 0; noise → ≫ 1);
* KID — kernel inception distance (cubic polynomial kernel, unbiased) between 48² crops
  centred on the seam and 48² crops of real held-out tissue, in a fixed random-convolution
  feature bank (seeded, 3 conv layers, 160 features) — until the metrics issue's
  functions exist; lower is more like real tissue;
* ms / tile — wall time per 512² tile on this machine.

Methods: the engines (``--models``, default ``default`` when it is installed and the
UNTRAINED ``tiny``) by partial diffusion at each engine's own τ (``--strength`` sets
others; PixCell's and tiny's is 0.55, the embedded default's 0.35) with the seam blend;
``cv2.inpaint`` (Telea) of the band; ``cv2.seamlessClone`` of D into O; multiband
blending (histosynth's weight-free harmoniser); and the un-harmonised composite. Two
reference rows put ΔE in scale: the band replaced by other real tissue, and the
composite kept down to 4 px with real finer detail added (a perfect generator that
invents only detail finer than 4 px).

    python scripts/bench_seam.py [--models tiny default] [--steps 20] [--strength own 0.55]
                                 [--guidance 1 2.5] [--out seam.json]

With ``--real-seams`` it runs the seam bench with real seams instead (scripts/
bench_seam_real.py: donors from other slides pasted into real backgrounds by
``histosynth synthesize`` in each ``--harmonise`` mode, no ground truth, scored by seam
visibility and KID of seam crops against real crops; its own options):

    python scripts/bench_seam.py --real-seams --world DIR [--samples 60] [--write-docs]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.inpaint.harmonise import harmonise_multiband
from histosynth.synthesis.inpaint.seam import seam_blend, seam_weights

TILE, SIGMA, CROP = 512, 15.0, 48


def held_out() -> np.ndarray:
    """The held-out part of the H&E sample: its bottom half (rows 500–999)."""
    return np.ascontiguousarray(he_source_image()[500:])


def samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` (O, D, E) triples from the held-out region, seeded."""
    region = held_out()
    h, w = region.shape[:2]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pad = cv2.copyMakeBorder(
            region, 0, max(0, TILE - h), 0, max(0, TILE - w), cv2.BORDER_REFLECT_101
        )
        ox, dx = (int(v) for v in rng.integers(0, pad.shape[1] - TILE + 1, 2))
        tile = np.ascontiguousarray(pad[:TILE, ox : ox + TILE])
        donor = np.ascontiguousarray(np.rot90(pad[:TILE, dx : dx + TILE], int(rng.integers(4))))
        shift = rng.normal(0, 8, 3)
        donor = np.clip(donor.astype(np.float32) + shift, 0, 255).astype(np.uint8)
        mask = np.zeros((TILE, TILE), np.uint8)
        axes = (int(rng.integers(60, 130)), int(rng.integers(40, 90)))
        centre = (int(rng.integers(170, TILE - 170)), int(rng.integers(170, TILE - 170)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        composite = np.where(mask[..., None] > 0, donor, tile)
        out.append(
            {"tile": tile, "donor": donor, "mask": mask, "composite": composite, "centre": centre}
        )
    return out


def band_of(mask: np.ndarray) -> np.ndarray:
    inside = (mask > 0).astype(np.uint8)
    d = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5) + cv2.distanceTransform(
        inside, cv2.DIST_L2, 5
    )
    return d <= 2 * SIGMA


# --------------------------------------------------------------------------- metrics


def delta_e(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    la = cv2.cvtColor(a.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    lb = cv2.cvtColor(b.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    return float(np.linalg.norm(la - lb, axis=-1)[where].mean())


def hf_energy(image: np.ndarray, where: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    high = grey - cv2.GaussianBlur(grey, (0, 0), 1.5)
    return float((high**2)[where].mean())


class FeatureBank(torch.nn.Module):
    """A fixed, seeded random-convolution feature extractor (160-d per crop)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList()
        for cin, cout in ((3, 32), (32, 64), (64, 96)):
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin * 9) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)

    @torch.no_grad()
    def forward(self, crops: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
        feats = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            feats.append(x.mean((2, 3)))
            x = torch.nn.functional.avg_pool2d(x, 2)
        return torch.cat(feats[1:], 1).numpy().astype(np.float64)  # 64 + 96 features


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (Bińkowski et al.)."""
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float(
        (kaa.sum() - np.trace(kaa)) / (m * (m - 1))
        + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
        - 2 * kab.mean()
    )


def seam_crops(image: np.ndarray, mask: np.ndarray, count: int, rng) -> np.ndarray:
    contours, _ = cv2.findContours(
        (mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    points = np.concatenate([c[:, 0] for c in contours])
    half = CROP // 2
    out = []
    for i in rng.choice(len(points), count, replace=len(points) < count):
        x = int(np.clip(points[i][0], half, image.shape[1] - half))
        y = int(np.clip(points[i][1], half, image.shape[0] - half))
        out.append(image[y - half : y + half, x - half : x + half])
    return np.stack(out)


def real_crops(count: int, rng) -> np.ndarray:
    region = held_out()
    ys = rng.integers(0, region.shape[0] - CROP, count)
    xs = rng.integers(0, region.shape[1] - CROP, count)
    return np.stack([region[y : y + CROP, x : x + CROP] for y, x in zip(ys, xs, strict=True)])


# --------------------------------------------------------------------------- methods


def telea(s):
    band = band_of(s["mask"]).astype(np.uint8)
    return cv2.inpaint(s["composite"], band, 5, cv2.INPAINT_TELEA)


def seamless(s):
    """OpenCV's Poisson cloning of the donor into the tile (it alters ``s["mask"]``)."""
    bgr = cv2.seamlessClone(
        cv2.cvtColor(s["donor"], cv2.COLOR_RGB2BGR),
        cv2.cvtColor(s["tile"], cv2.COLOR_RGB2BGR),
        s["mask"],
        s["centre"],
        cv2.NORMAL_CLONE,
    )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def multiband(s):
    return harmonise_multiband(s["tile"], s["composite"], s["mask"], sigma=SIGMA)


def composite_only(s):
    return s["composite"]


def _other_tissue(s) -> np.ndarray:
    """Another held-out 512² crop, chosen by the sample's centre (seeded, no model)."""
    region = held_out()
    pad = cv2.copyMakeBorder(
        region, 0, max(0, TILE - region.shape[0]), 0, 0, cv2.BORDER_REFLECT_101
    )
    x = (s["centre"][0] * 7919) % (pad.shape[1] - TILE + 1)
    return np.ascontiguousarray(pad[:TILE, x : x + TILE])


def oracle_detail(s, sigma: float = 4.0):
    """A reference, not a method: the composite's own structure down to ``sigma`` px with
    real tissue's finer detail (from another crop) added — what a perfect generator that
    kept everything coarser than ``sigma`` and invented only finer detail would score.
    Partial diffusion at τ = 0.55 keeps far less (√ᾱ = 0.21 of the signal)."""
    comp, other = s["composite"].astype(np.float32), _other_tissue(s).astype(np.float32)
    detail = other - cv2.GaussianBlur(other, (0, 0), sigma)
    gen = np.clip(np.rint(cv2.GaussianBlur(comp, (0, 0), sigma) + detail), 0, 255)
    return seam_blend(s["composite"], gen.astype(np.uint8), seam_weights(s["mask"], SIGMA))


def other_tissue(s):
    """A reference: the band replaced by other real tissue (same blend weights)."""
    return seam_blend(s["composite"], _other_tissue(s), seam_weights(s["mask"], SIGMA))


def diffusion(
    spec: str, steps: int, strength: float | None = None, guidance: float | None = None
) -> Callable | None:
    """The seam regenerated by an engine at τ = ``strength`` (``None``: the engine's own
    τ, ``Engine.strength``) in ``steps`` steps of the full schedule with CFG scale
    ``guidance`` (``None``: the pipeline's default): ``spec`` is ``MODEL`` or
    ``MODEL:SAMPLER``."""
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.errors import EngineError

    model, _, sampler = spec.partition(":")
    try:
        engine = load_engine(model, device="cpu", tile_size=TILE if model == "tiny" else None)
    except EngineError as err:
        print(f"skipping {model}: {err}")
        return None
    if engine.tile_size != TILE:
        print(f"skipping {model}: it makes {engine.tile_size} px tiles, not {TILE}")
        return None
    pipe = engine.inpaint_pipeline(sampler or None)
    pipe.set_progress_bar_config(disable=True)
    strength = engine.strength if strength is None else strength

    options = {} if guidance is None else {"guidance_scale": guidance}

    def run(s):
        # the pipeline's images are already seam-blended (X_final): blend once, not twice
        return pipe(
            s["composite"],
            s["mask"],
            strength=strength,
            num_inference_steps=steps,
            seeds=[0],
            seam_sigma=SIGMA,
            **options,
        ).images[0]

    run.label = (
        f"{model} engine ({'trained' if engine.trained else 'UNTRAINED'}, "
        f"{sampler or engine.sampler})"
    )
    run.label += f" τ {strength:g}" + (" (its default)" if strength == engine.strength else "")
    run.label += f", {steps} steps" + ("" if guidance is None else f", guidance {guidance:g}")
    return run


def autoencoder_round_trip(spec: str) -> Callable | None:
    """The floor of every latent method: the engine's autoencoder alone (encode, decode)
    blended in at the seam, no denoising."""
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.errors import EngineError

    model = spec.partition(":")[0]
    try:
        engine = load_engine(model, device="cpu")
    except EngineError:
        return None
    codec = engine.inpaint_pipeline().codec

    def run(s):
        decoded = codec.decode(codec.encode(s["composite"][None]), output="numpy")[0]
        return seam_blend(s["composite"], decoded, seam_weights(s["mask"], SIGMA))

    run.label = f"{model} engine's autoencoder round trip only (the floor)"
    return run


def real_seams(argv: list[str]) -> dict:
    """``--real-seams``: scripts/bench_seam_real.py's bench with ``argv`` (loaded by path)."""
    import importlib.util
    from pathlib import Path

    name = "bench_seam_real"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("bench_seam_real.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name].main(argv)


def main(argv: list[str] | None = None) -> dict:
    if "--real-seams" in (given := sys.argv[1:] if argv is None else argv):
        return real_seams([a for a in given if a != "--real-seams"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=["default", "tiny"],
        help="engines, each MODEL or MODEL:SAMPLER (e.g. default:ddim)",
    )
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[20], help="steps of the full schedule; "
        "several give one row each"
    )
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=[None], help="CFG scales of the "
        "engines (1: no unconditional pass); several give one row each [the pipeline's]"
    )
    parser.add_argument(
        "--strength",
        type=lambda v: None if v == "own" else float(v),
        nargs="+",
        default=[None],
        help="τ of the engines' partial diffusion, or 'own'; several give one row each "
        "(default: each engine's own, 0.55 for PixCell and the tiny engine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    data = samples(args.samples, args.seed)
    methods: list[tuple[str, Callable]] = []
    for model in args.models:
        for strength, steps, guidance in itertools.product(
            args.strength, args.steps, args.guidance
        ):
            run = diffusion(model, steps, strength, guidance)
            if run is None:
                break
            if all(label != run.label for label, _ in methods):  # "own" may equal a τ named
                methods.append((run.label, run))
    trained = [m for m in args.models if m.partition(":")[0] != "tiny"]
    floor_run = autoencoder_round_trip(trained[0]) if trained else None
    if floor_run is not None:
        methods.append((floor_run.label, floor_run))
    methods += [
        ("cv2.inpaint (Telea)", telea),
        ("cv2.seamlessClone", seamless),
        ("multiband (histosynth)", multiband),
        ("composite (none)", composite_only),
        ("reference: other real tissue in the band", other_tissue),
        ("reference: composite ≥ 4 px + real finer detail", oracle_detail),
    ]
    bank = FeatureBank(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    real = bank(real_crops(64 * args.samples // 2, rng))
    rows = []
    for label, method in methods:
        de, hf, crops, seconds = [], [], [], []
        for k, s in enumerate(data):
            # a copy for each method: cv2.seamlessClone writes into the mask it is given
            given = {key: np.array(value, copy=True) for key, value in s.items()}
            start = time.perf_counter()
            out = method(given)
            seconds.append(time.perf_counter() - start)
            band = band_of(s["mask"])
            de.append(delta_e(out, s["composite"], band))
            hf.append(hf_energy(out, band) / hf_energy(s["composite"], band))
            crops.append(seam_crops(out, s["mask"], 32, np.random.default_rng(k)))
        rows.append(
            {
                "method": label,
                "delta_e": float(np.mean(de)),
                "hf_ratio": float(np.mean(hf)),
                "kid": kid(bank(np.concatenate(crops)), real),
                "ms_per_tile": 1000 * float(np.median(seconds)),
            }
        )
    real_b = bank(real_crops(64 * args.samples // 2, np.random.default_rng(args.seed + 2)))
    floor = kid(real_b, real)
    taus = ", ".join("each engine's own" if t is None else f"{t:g}" for t in args.strength)
    print(
        f"held-out H&E: {args.samples} tiles of {TILE}² (TIAToolbox sample, rows 500–999), "
        f"seam band ±{2 * SIGMA:.0f} px, diffusion τ = {taus}, "
        f"{'/'.join(map(str, args.steps))} steps, CPU"
    )
    print("| method | ΔE (band) | HF ratio | KID ×10³ | ms / tile |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['delta_e']:.2f} | {r['hf_ratio']:.2f} | "
            f"{1000 * r['kid']:.2f} | {r['ms_per_tile']:.0f} |"
        )
    print(f"KID ×10³ of real crops against real crops (the floor): {1000 * floor:.2f}")
    result = {
        "rows": rows,
        "kid_real_vs_real": floor,
        "samples": args.samples,
        "steps": args.steps,
        "guidance": args.guidance,
        "strengths": args.strength,
        "tile": TILE,
        "sigma": SIGMA,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
