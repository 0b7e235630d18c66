"""Train the small embedded default engine from scratch on the H&E shipped with the dependencies.

    python scripts/train_default_engine.py --out DIR [--minutes-vae M --minutes-dit M] [--quick]

Stages (each timed, all on the CPU by default):

1. the autoencoder — a diffusers ``AutoencoderKL`` (3 blocks → ×4 down-sampling, 16 latent
   channels, SD3's scale / shift), trained by :func:`histosynth.synthesis.training.
   autoencoder.train_autoencoder` on random crops of the training rows, then its latents
   normalised (:func:`normalise_latents`);
2. the feature cache — training and held-out 512² tiles (rows padded to 512 by reflection,
   as ``scripts/bench_seam.py`` does; training tiles in the 8 flips / rotations, plus
   ``vessel_tiles`` with vessels painted in from the training rows' own crops) encoded
   by that VAE and the conditioning encoder (:class:`TinyEncoder`, a seeded fixed
   projection of per-crop colour / texture statistics, 4 rows of 256² crops per tile) with
   :func:`histosynth.synthesis.cache.build_cache`;
3. the denoiser — a fresh small ``PixCellTransformer2DModel`` (patch 4, KV-compressed
   self-attention in its second half) trained with every parameter by the project's
   trainer (:func:`run_training`) on the timesteps img2img uses at τ = 0.55 (< 560),
   validated on the held-out tiles, in chunks of ``--checkpoint-every`` steps so that the
   ``--minutes-dit`` budget can stop it at a checkpoint;
4. the engine folder (:func:`save_engine`, ``trained=True``) + ``MODEL_CARD.md`` +
   ``training.json`` + ``preview.jpg`` (held-out tiles, their reconstructions, an inpainted
   composite through this engine and through the UNTRAINED tiny engine).

Data: TIAToolbox's ``target_image.png`` (1000² H&E, ``he_source_image()``), rows 0–499 for
training, rows 500–999 held out. ``--quick`` runs every stage at toy sizes (< 60 s, tests).
Work files (checkpoints, cache) go to ``--work-dir`` (default ``OUT-work``); ``--resume``
continues a cut-off run from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HE_SOURCE = (
    "TIAToolbox 2.x test/sample data `target_image.png` (1000×1000 px H&E), read by "
    "`histosynth.integration.demo.data.he_source_image()`; TIAToolbox is BSD-3-Clause"
)
# More H&E inside installable packages (``pip install "histosynth[train-data]"``), found
# without importing them; the autoencoder trains on them too (they are smaller than a tile).
EXTRA_HE = (
    (
        "stardist",
        "data/images/histo.jpg",
        "stardist `data/images/histo.jpg` (500×300 px H&E), BSD-3-Clause",
    ),
    (
        "wsidicom_data",
        "data/encoded/JPEG_Baseline_(Process_1)-RGB-8.jpg",
        "wsidicom-data `JPEG_Baseline_(Process_1)-RGB-8.jpg` (240×240 px H&E), Apache-2.0",
    ),
)

FULL = {
    "tile": 512,
    "crop": 256,
    "dim": 32,
    "vae_blocks": (32, 64, 64),
    "vae_steps": 1300,
    "vae_batch": 8,
    "vae_crop": 64,
    "vae_lr": 1e-3,
    # hidden 320 > the 4·4·16 = 256 values of a latent patch: a narrower token cannot pass
    # the noise of a patch through, which leaves speckle at small timesteps
    "dit_heads": 5,
    "dit_head_dim": 64,
    "dit_layers": 4,
    "patch": 4,
    "dit_steps": 4000,
    "dit_batch": 4,
    "dit_lr": 3e-4,
    "checkpoint_every": 100,
    "ema_decay": 0.995,
    "x_step": 32,
    "val_offsets": 8,
    "vessel_tiles": 48,
    "minutes_vae": 19.0,
    "minutes_dit": 55.0,
    # the engine's default τ: on scripts/bench_seam.py's held-out seams ΔE ≤ 5 needs
    # τ ≤ 0.35 with this (linear β) schedule, where PixCell's 0.55 leaves √ᾱ = 0.21 of
    # the composite (ΔE 7.2); the engine folder records it, --strength overrides it
    "strength": 0.35,
}
QUICK = {
    "tile": 64,
    "crop": 32,
    "dim": 16,
    "vae_blocks": (8, 16, 16),
    "vae_steps": 4,
    "vae_batch": 2,
    "vae_crop": 32,
    "vae_lr": 1e-3,
    "dit_heads": 2,
    "dit_head_dim": 16,
    "dit_layers": 2,
    "patch": 4,
    "dit_steps": 4,
    "dit_batch": 2,
    "dit_lr": 3e-4,
    "checkpoint_every": 2,
    "ema_decay": 0.995,
    "x_step": 400,
    "val_offsets": 2,
    "vessel_tiles": 1,
    "minutes_vae": None,
    "minutes_dit": None,
    "strength": 0.35,
}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_vae(p: dict[str, Any]):
    from diffusers import AutoencoderKL

    from histosynth.synthesis.models.vae import (
        SD3_LATENT_CHANNELS,
        SD3_SCALING_FACTOR,
        SD3_SHIFT_FACTOR,
    )

    n = len(p["vae_blocks"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(p["vae_blocks"]),
        layers_per_block=1,
        latent_channels=SD3_LATENT_CHANNELS,
        norm_num_groups=8,
        scaling_factor=SD3_SCALING_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR,
        sample_size=p["tile"],
    )


def build_transformer(p: dict[str, Any], down: int):
    from histosynth.synthesis.models.kv_compression import enable_kv_compression
    from histosynth.synthesis.models.transformer import PixCellTransformer2DModel

    hidden = p["dit_heads"] * p["dit_head_dim"]
    tokens = (p["tile"] // p["crop"]) ** 2
    model = PixCellTransformer2DModel(
        num_attention_heads=p["dit_heads"],
        attention_head_dim=p["dit_head_dim"],
        in_channels=16,
        out_channels=32,
        num_layers=p["dit_layers"],
        cross_attention_dim=hidden,
        attention_bias=True,
        sample_size=p["tile"] // down,
        patch_size=p["patch"],
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1.0,
        use_additional_conditions=False,
        caption_channels=p["dim"],
        caption_num_tokens=tokens,
        attention_type="default",
    )
    layers = p["dit_layers"]
    enable_kv_compression(model, ratio=2, blocks=list(range(layers // 2, layers)))
    return model


def extra_he_images() -> list[tuple[np.ndarray, str]]:
    """The H&E images of :data:`EXTRA_HE` whose packages are installed, with their sources."""
    import importlib.util

    import cv2

    found = []
    for package, relative, source in EXTRA_HE:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            found.append((cv2.cvtColor(image, cv2.COLOR_BGR2RGB), source))
    return found


def half_weights(folder: Path) -> None:
    """Store the float32 tensors of ``folder``'s safetensors as float16 (loading casts back)."""
    import os

    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = {
            k: (v.half() if v.dtype == torch.float32 else v) for k, v in load_file(path).items()
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def pad_rows(region: np.ndarray, tile: int) -> np.ndarray:
    import cv2

    h = region.shape[0]
    return cv2.copyMakeBorder(region, 0, max(0, tile - h), 0, 0, cv2.BORDER_REFLECT_101)


def tiles_of(region: np.ndarray, tile: int, offsets: list[int], transforms: range, kind: str):
    from histosynth.synthesis.cache import CacheTile

    pad = pad_rows(region, tile)
    out = []
    for x in offsets:
        base = np.ascontiguousarray(pad[:tile, x : x + tile])
        for k in transforms:
            image = np.rot90(base[:, ::-1] if k >= 4 else base, k % 4)
            out.append(
                CacheTile(
                    f"{kind}-x{x}-d{k}",
                    np.ascontiguousarray(image),
                    np.zeros((tile, tile), np.uint8),
                    source=f"he rows {kind}",
                    kind="background",
                )
            )
    return out


def vessel_tiles(
    region: np.ndarray, tile: int, count: int, seed: int, crops_from: np.ndarray
) -> list:
    """``count`` tiles of ``region`` with 1–2 vessels painted in from real crops of
    ``crops_from`` (:func:`~histosynth.integration.demo.vessels.paint_vessel`, as the
    demo's donors are made), masked, so the denoiser also learns walls, lumens and red
    cells: diameters 12–43 % of the tile (30–110 µm at 512 px, 0.5 µm/px), one in four
    invasive. Pass training pixels only, for both."""
    import cv2

    from histosynth.integration.demo.crops import build_crop_library
    from histosynth.integration.demo.vessels import paint_vessel, random_shape
    from histosynth.synthesis.cache import CacheTile

    mpp = 0.5
    library = build_crop_library(np.ascontiguousarray(crops_from))
    pad = pad_rows(region, tile)
    rng = np.random.default_rng([seed, 7])
    out = []
    for n in range(count):
        x = int(rng.integers(0, pad.shape[1] - tile + 1))
        k = int(rng.integers(8))
        base = np.ascontiguousarray(pad[:tile, x : x + tile])
        image = np.ascontiguousarray(np.rot90(base[:, ::-1] if k >= 4 else base, k % 4))
        mask = np.zeros((tile, tile), np.uint8)
        placed: list = []
        for _ in range(int(rng.integers(1, 3))):
            diameter = float(rng.uniform(0.12, 0.43)) * tile
            diameter_um = diameter * mpp * 512 / tile
            shape = random_shape(rng, diameter, 0.05)
            r = shape.radius
            for _try in range(50):
                shape.cx = float(rng.uniform(r + 4, tile - r - 4))
                shape.cy = float(rng.uniform(r + 4, tile - r - 4))
                if all(np.hypot(shape.cx - o.cx, shape.cy - o.cy) > r + o.radius + 8
                       for o in placed):
                    break
            else:
                continue
            wall = float(np.clip(rng.uniform(0.18, 0.3) + diameter_um / 1500, 0.15, 0.45))
            paint_vessel(image, shape, wall, mpp, rng, library, invasive=rng.random() < 0.25)
            cv2.fillPoly(mask, [np.round(shape.outline()).astype(np.int32)], 255)
            placed.append(shape)
        out.append(CacheTile(f"vessel-{n}-x{x}-d{k}", image, mask, source="he rows train, "
                             "painted vessels", kind="vessel"))
    return out


def n_params(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="engine folder to write")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and cache (OUT-work)")
    parser.add_argument("--minutes-vae", type=float, help="wall-time cap of stage 1 (14; 0 = none)")
    parser.add_argument("--minutes-dit", type=float, help="wall-time cap of stage 3 (60; 0 = none)")
    parser.add_argument("--vae-steps", type=int, help="autoencoder steps")
    parser.add_argument("--dit-steps", type=int, help="denoiser steps")
    parser.add_argument("--quick", action="store_true", help="toy sizes (< 60 s, tests)")
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir")
    parser.add_argument("--no-preview", action="store_true", help="skip preview.jpg")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--generator-from",
        type=Path,
        help="train only the companion generator: a copy of this engine folder's denoiser "
        "fine-tuned over the whole timestep range (written to OUT/generator)",
    )
    args = parser.parse_args(argv)
    if args.generator_from is not None:
        return train_generator(args, parser)

    from histosynth.integration.demo.data import he_source_image
    from histosynth.synthesis.abilities import EngineAbilities
    from histosynth.synthesis.cache import CacheDataset, build_cache
    from histosynth.synthesis.engine import (
        PIXCELL_SCHEDULER_CONFIG,
        Engine,
        save_engine,
    )
    from histosynth.synthesis.models.encoders import TinyEncoder
    from histosynth.synthesis.models.vae import LatentCodec
    from histosynth.synthesis.training.autoencoder import (
        normalise_latents,
        reconstruction_metrics,
        train_autoencoder,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    p = dict(QUICK if args.quick else FULL)
    if args.vae_steps:
        p["vae_steps"] = args.vae_steps
    if args.dit_steps:
        p["dit_steps"] = args.dit_steps
    for key in ("minutes_vae", "minutes_dit"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key) or None
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty")
    work = args.work_dir or out.with_name(out.name + "-work")
    if work.exists() and any(work.iterdir()) and not args.resume:
        parser.error(f"{work} holds an earlier run; pass --resume or remove it")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    times: dict[str, float] = {}
    report: dict[str, Any] = {"params": p, "seed": args.seed}

    image = he_source_image()
    train_region, held_region = image[:500], image[500:]
    extra = [] if args.quick else extra_he_images()
    if args.quick:  # toy sizes: a corner of each half
        train_region, held_region = train_region[:64, :256], held_region[:64, :256]
    sources = [HE_SOURCE] + [source for _, source in extra]
    report["sources"] = sources
    log("data: " + "; ".join(sources))

    # ---------------------------------------------------------------- 1. autoencoder
    t0 = time.perf_counter()
    vae = build_vae(p)
    down = 2 ** (len(p["vae_blocks"]) - 1)
    log(
        f"stage 1: autoencoder {n_params(vae) / 1e6:.2f} M parameters, ×{down}, "
        f"{p['vae_steps']} steps"
    )
    before = reconstruction_metrics(vae, [held_region])

    def vae_progress(r: dict[str, Any]) -> None:
        if r["step"] % 50 == 0:
            log(
                f"  vae step {r['step']} loss {r['loss']:.4f} l1 {r['l1']:.4f} "
                f"({r['seconds']:.0f} s)"
            )

    vae_run = train_autoencoder(
        vae,
        [train_region] + [im for im, _ in extra],
        steps=p["vae_steps"],
        batch_size=p["vae_batch"],
        crop=p["vae_crop"],
        lr=p["vae_lr"],
        seed=args.seed,
        work_dir=work / "vae",
        checkpoint_every=50,
        max_seconds=p["minutes_vae"] * 60 if p["minutes_vae"] else None,
        progress=vae_progress,
    )
    stats = normalise_latents(vae, [train_region])
    vae_metrics = {
        "held_out": reconstruction_metrics(vae, [held_region]),
        "train": reconstruction_metrics(vae, [train_region]),
        "held_out_untrained": before,
    }
    times["vae_s"] = time.perf_counter() - t0
    log(f"  vae done: {vae_run['steps']} steps, held-out {vae_metrics['held_out']}")
    report["vae"] = {
        "steps": vae_run["steps"],
        "completed": vae_run["completed"],
        "final_loss": vae_run["final_loss"],
        "metrics": vae_metrics,
        "latent_stats_before_normalisation": stats,
        "history": vae_run["history"][:: max(1, len(vae_run["history"]) // 30)],
    }

    # ---------------------------------------------------------------- 2. feature cache
    t0 = time.perf_counter()
    tile = p["tile"]
    encoder = TinyEncoder(dim=p["dim"], seed=args.seed, crop=p["crop"])
    train_tiles, val_tiles = _denoiser_tiles(p, image, args.seed, args.quick)
    cache_path = work / "cache.h5"
    if cache_path.exists():
        cache_path.unlink()  # the VAE may have changed since; rebuilt (cheap)
    codec = LatentCodec(vae)
    build_cache(
        cache_path,
        train_tiles + val_tiles,
        codec=codec,
        encoder=encoder,
        tile_size=tile,
        mpp=0.5,
        model_id="histosynth-mini",
        batch_size=4,
    )
    times["cache_s"] = time.perf_counter() - t0
    n_train = len(train_tiles)
    train_idx = list(range(n_train))
    val_idx = list(range(n_train, n_train + len(val_tiles)))
    log(
        f"stage 2: cache of {n_train} training + {len(val_idx)} held-out {tile}² tiles "
        f"({times['cache_s']:.0f} s)"
    )

    # ---------------------------------------------------------------- 3. denoiser
    t0 = time.perf_counter()
    transformer = build_transformer(p, down)
    transformer.requires_grad_(True).train()
    log(
        f"stage 3: denoiser {n_params(transformer) / 1e6:.2f} M parameters, "
        f"{(tile // down // p['patch']) ** 2} tokens, up to {p['dit_steps']} steps"
    )
    dataset = CacheDataset(cache_path, preload=True, seed=args.seed)
    dit_work = work / "dit"
    result, done, _, initial = train_denoiser(
        transformer, dataset, train_idx, val_idx, p, seed=args.seed, work=dit_work,
        timesteps=(0, 560), fingerprint={"kind": "default-engine", "vae": list(p["vae_blocks"])},
        resume=args.resume, name="dit",
    )
    transformer.eval().requires_grad_(False)
    times["dit_s"] = time.perf_counter() - t0
    train_losses = [(h["step"], round(h["loss"], 4)) for h in _read_log(dit_work) if "loss" in h]
    report["dit"] = {
        "steps": done,
        "metrics": result.metrics,
        "initial": initial,
        "validation": [
            {k: v for k, v in h.items() if k.startswith(("step", "val"))}
            for h in _read_log(dit_work)
            if "val_loss" in h
        ],
        "train_loss": train_losses[:: max(1, len(train_losses) // 30)],
    }

    # ---------------------------------------------------------------- 4. save
    t0 = time.perf_counter()
    model_id = f"histosynth-mini-{tile}" if not args.quick else f"histosynth-mini-quick-{tile}"
    engine = Engine(
        transformer=transformer,
        vae=vae,
        encoder=encoder,
        scheduler_config=dict(PIXCELL_SCHEDULER_CONFIG),
        preset="default",
        tile_size=tile,
        mpp=0.5,
        device=torch.device("cpu"),
        dtype=torch.float32,
        trained=True,
        model_id=model_id,
        strength=p["strength"],
        # the seam denoiser learnt timesteps < 560 only: no generation from noise
        abilities=EngineAbilities(timesteps=(0, 560), generates=False, tile_sizes=(tile,)),
        title=(
            f"histosynth mini default engine ({tile} px, trained on {n_train} H&E tiles of "
            "TIAToolbox's sample; a small CPU-trained model, not PixCell)"
        ),
    )
    training = {
        "data": HE_SOURCE,
        "train_rows": "0-499",
        "held_out_rows": "500-999",
        "vae_steps": report["vae"]["steps"],
        "dit_steps": done,
        "vae_held_out": vae_metrics["held_out"],
        "dit_val_loss": result.metrics,
        "seed": args.seed,
    }
    training["sources"] = sources
    training["minutes"] = round(sum(times.values()) / 60, 1)
    training["hardware"] = f"{torch.get_num_threads()} CPU threads ({platform.machine()})"
    save_engine(engine, out, training=training)
    half_weights(out / "transformer")
    times["save_s"] = time.perf_counter() - t0
    sizes = {
        "transformer_mb": folder_mb(out / "transformer"),
        "vae_mb": folder_mb(out / "vae"),
        "encoder_mb": folder_mb(out / "encoder"),
        "total_mb": folder_mb(out),
    }
    report.update(
        times=times,
        sizes=sizes,
        parameters={
            "vae": n_params(vae),
            "transformer": n_params(transformer),
            "encoder": n_params(encoder),
        },
        kv_compress=transformer.config.kv_compress_ratio,
        kv_compress_blocks=transformer.config.kv_compress_blocks,
    )

    # ---------------------------------------------------------------- 5. preview
    if not args.no_preview:
        t0 = time.perf_counter()
        report["preview"] = str(make_preview(out, held_region, tile, quick=args.quick))
        times["preview_s"] = time.perf_counter() - t0
    (out / "training.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_loss_curves(report, out / "loss_curves.png")
    (out / "MODEL_CARD.md").write_text(model_card(report, model_id, n_train, len(val_idx)))
    log(f"done: {out} ({sizes['total_mb']:.2f} MB), times {times}")
    return report


def train_denoiser(
    transformer: torch.nn.Module,
    dataset: Any,
    train_idx: list[int],
    val_idx: list[int],
    p: dict[str, Any],
    *,
    seed: int,
    work: Path,
    timesteps: tuple[int, int],
    fingerprint: dict[str, Any],
    resume: bool,
    name: str,
) -> tuple[Any, int, list[dict[str, Any]], dict[str, float]]:
    """The denoiser's training loop (every parameter, ε-MSE with Min-SNR-γ 5, CFG dropout
    0.1, EMA) on ``timesteps``, in chunks of ``checkpoint_every`` steps, stopped at a
    checkpoint once ``p['minutes_dit']`` would be exceeded; ``resume`` continues from the
    last checkpoint in ``work``. Returns the last result, the steps done, the held-out
    history and the loss before training."""
    from histosynth.synthesis.engine import make_scheduler
    from histosynth.synthesis.training import TrainConfig, run_training
    from histosynth.synthesis.training.checkpoints import latest_checkpoint

    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    initial: dict[str, float] = {}
    done, result = 0, None
    if resume:
        latest = latest_checkpoint(work / "checkpoints")
        done = latest.step if latest is not None else 0
    budget = p["minutes_dit"] * 60 if p["minutes_dit"] else None
    while done < p["dit_steps"]:
        config = TrainConfig(
            steps=min(p["dit_steps"], done + p["checkpoint_every"]),
            batch_size=p["dit_batch"],
            lr=p["dit_lr"],
            lr_scheduler="constant",
            snr_gamma=5.0,
            uncond_prob=0.1,
            timestep_range=timesteps,
            seed=seed,
            checkpoint_every=p["checkpoint_every"],
            keep_best=1,
            sample_every=0,
            attention="sdpa",
            max_grad_norm=1.0,
            weight_decay=0.0,
            ema=True,
            ema_decay=p["ema_decay"],
        )
        result = run_training(
            transformer,
            dataset,
            train_idx,
            val_idx,
            config=config,
            noise_scheduler=make_scheduler("ddpm"),
            work_dir=work,
            fingerprint=fingerprint,
            resume=done > 0 or resume,
            device=torch.device("cpu"),
        )
        if "val_loss_initial" in result.metrics:
            initial = {"step": 0, "val_loss": result.metrics["val_loss_initial"]}
        history.extend(h for h in result.history if "val_loss" in h)
        done = result.steps
        elapsed = time.perf_counter() - t0
        log(f"  {name} step {done}: val_loss {result.metrics.get('val_loss', float('nan')):.4f} "
            f"({elapsed:.0f} s)")
        if budget is not None and elapsed + elapsed / max(1, done) * p["checkpoint_every"] > budget:
            log(f"  {name} time budget reached")
            break
    assert result is not None
    return result, done, history, initial


def _denoiser_tiles(p: dict[str, Any], image: np.ndarray, seed: int, quick: bool):
    """The denoiser's training tiles (rows 0–499 in the 8 symmetries, plus tiles with
    vessels painted in) and held-out tiles (rows 500–999), as stage 2 caches them."""
    train_region, held_region = image[:500], image[500:]
    if quick:
        train_region, held_region = train_region[:64, :256], held_region[:64, :256]
    tile = p["tile"]
    last = train_region.shape[1] - tile
    train_x = sorted({*range(0, last + 1, p["x_step"]), last})
    val_x = sorted(
        {round(v) for v in np.linspace(0, held_region.shape[1] - tile, p["val_offsets"])}
    )
    train_tiles = tiles_of(train_region, tile, train_x, range(8), "train")
    train_tiles += vessel_tiles(train_region, tile, p["vessel_tiles"], seed, crops_from=image[:500])
    return train_tiles, tiles_of(held_region, tile, val_x, range(1), "heldout")


def train_generator(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Stage 3 again, over all 1000 timesteps, from the denoiser of ``--generator-from``.

    The seam denoiser of the default engine learnt only the timesteps img2img uses
    (< 560), so it cannot start from pure noise. Its companion generator is a copy
    fine-tuned with timesteps drawn from the whole schedule (Min-SNR-γ 5, CFG dropout 0.1,
    EMA), on the same cache (the engine's own VAE and encoder), for ``--dit-steps`` steps
    or ``--minutes-dit`` minutes; written (float16) to ``OUT/generator`` with
    ``OUT/generator.json`` (its steps, losses, times), for ``scripts/install_default_engine.py``
    or a copy into the engine folder.
    """
    from histosynth.integration.demo.data import he_source_image
    from histosynth.synthesis.cache import CacheDataset, build_cache
    from histosynth.synthesis.engine import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    p = dict(QUICK if args.quick else FULL)
    p["dit_steps"] = args.dit_steps or (4 if args.quick else 1500)
    p["minutes_dit"] = args.minutes_dit if args.minutes_dit is not None else (
        None if args.quick else 60.0)
    out: Path = args.out
    if (out / "generator").exists():
        parser.error(f"{out / 'generator'} exists")
    work = args.work_dir or out.with_name(out.name + "-work")
    if work.exists() and any(work.iterdir()) and not args.resume:
        parser.error(f"{work} holds an earlier run; pass --resume or remove it")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    engine = load_engine(args.generator_from, device="cpu", dtype="float32")
    p["tile"] = engine.tile_size
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train_tiles, val_tiles = _denoiser_tiles(p, he_source_image(), args.seed, args.quick)
    cache_path = work / "cache.h5"
    if not cache_path.exists():
        build_cache(
            work / "cache.tmp.h5",
            train_tiles + val_tiles,
            codec=engine.codec,
            encoder=engine.encoder,
            tile_size=engine.tile_size,
            mpp=engine.mpp,
            model_id=engine.model_id,
            batch_size=4,
        )
        (work / "cache.tmp.h5").rename(cache_path)
    times["cache_s"] = time.perf_counter() - t0
    n_train = len(train_tiles)
    train_idx, val_idx = list(range(n_train)), list(range(n_train, n_train + len(val_tiles)))
    log(f"generator: cache of {n_train} + {len(val_idx)} tiles ({times['cache_s']:.0f} s)")

    t0 = time.perf_counter()
    transformer = engine.transformer
    transformer.requires_grad_(True).train()
    dataset = CacheDataset(cache_path, preload=True, seed=args.seed)
    dit_work = work / "generator"
    result, done, _, _ = train_denoiser(
        transformer, dataset, train_idx, val_idx, p, seed=args.seed, work=dit_work,
        timesteps=(0, 1000), fingerprint={"kind": "default-generator", "base": engine.model_id},
        resume=args.resume, name="generator",
    )
    times["generator_s"] = time.perf_counter() - t0
    transformer.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".generator.tmp"
    transformer.save_pretrained(tmp, safe_serialization=True)
    half_weights(tmp)
    tmp.rename(out / "generator")
    record = {
        "base": engine.model_id,
        "steps": done,
        "timestep_range": [0, 1000],
        "batch": p["dit_batch"],
        "lr": p["dit_lr"],
        "ema_decay": p["ema_decay"],
        "val_loss": result.metrics,
        "validation": [
            {k: v for k, v in h.items() if k.startswith(("step", "val"))}
            for h in _read_log(dit_work)
            if "val_loss" in h
        ],
        "times": times,
        "hardware": f"{torch.get_num_threads()} CPU threads ({platform.machine()})",
        "seed": args.seed,
    }
    (out / "generator.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    log(f"done: {out / 'generator'} ({done} steps, {sum(times.values()) / 60:.1f} min)")
    return record


def plot_loss_curves(report: dict[str, Any], path: Path) -> Path:
    """The autoencoder's training loss and the denoiser's training and held-out losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vae, dit = report["vae"], report["dit"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    left.plot([h["step"] for h in vae["history"]], [h["loss"] for h in vae["history"]])
    left.set(title="autoencoder", xlabel="step", ylabel="L1 + grad-L1 + KL loss", yscale="log")
    steps, losses = zip(*dit["train_loss"], strict=True) if dit["train_loss"] else ((), ())
    right.plot(steps, losses, label="training (Min-SNR weighted)", alpha=0.6)
    val = [(0, dit["initial"]["val_loss"])] if dit.get("initial") else []
    val += [(h["step"], h["val_loss"]) for h in dit["validation"]]
    if val:
        right.plot(*zip(*val, strict=True), "o-", label="held out (ε-MSE)")
    right.set(title="denoiser", xlabel="step", ylabel="loss", yscale="log")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _read_log(work: Path) -> list[dict[str, Any]]:
    path = work / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_preview(out: Path, held_region: np.ndarray, tile: int, *, quick: bool) -> Path:
    """Held-out tiles | reconstructions, and one composite inpainted by both engines."""
    import cv2

    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.training.autoencoder import reconstruct

    engine = load_engine(out, device="cpu")
    pad = pad_rows(held_region, tile)
    w = pad.shape[1]
    xs = [0, (w - tile) // 2, w - tile]
    originals = [np.ascontiguousarray(pad[:tile, x : x + tile]) for x in xs]
    recs = [reconstruct(engine.vae, o) for o in originals]
    # composite: the middle tile with an ellipse of the right tile, rotated 90°
    base, donor = originals[0], np.ascontiguousarray(np.rot90(originals[2]))
    mask = np.zeros((tile, tile), np.uint8)
    cv2.ellipse(mask, (tile // 2, tile // 2), (tile // 4, tile // 6), 30, 0, 360, 255, -1)
    composite = np.where(mask[..., None] > 0, donor, base).astype(np.uint8)
    steps = 2 if quick else 20
    rows_out = []
    for name in (str(out), "tiny"):
        eng = engine if name != "tiny" else load_engine("tiny", device="cpu", tile_size=tile)
        pipe = eng.inpaint_pipeline()
        pipe.set_progress_bar_config(disable=True)
        res = pipe(composite, mask, strength=eng.strength, num_inference_steps=steps, seeds=[0])
        rows_out.append((res.images[0], res.generated[0]))
    edge = cv2.dilate(mask, np.ones((3, 3), np.uint8)) - cv2.erode(mask, np.ones((3, 3), np.uint8))
    outlined = composite.copy()
    outlined[edge > 0] = (0, 255, 0)
    row1 = np.concatenate(originals + recs[:1], axis=1)
    row2 = np.concatenate([*recs[1:], composite, outlined], axis=1)
    row3 = np.concatenate([rows_out[0][0], rows_out[0][1], rows_out[1][0], rows_out[1][1]], axis=1)
    sheet = np.concatenate([row1, row2, row3], axis=0)
    labels = [
        "held-out A",
        "held-out B",
        "held-out C",
        "VAE(A)",
        "VAE(B)",
        "VAE(C)",
        "composite",
        "composite + seam",
        "trained: inpainted",
        "trained: raw decode",
        "tiny: inpainted",
        "tiny: raw decode",
    ]
    for i, text in enumerate(labels):
        r, c = divmod(i, 4)
        cv2.putText(
            sheet,
            text,
            (c * tile + 6, r * tile + 22),
            cv2.FONT_HERSHEY_SIMPLEX,
            max(0.3, tile / 900),
            (0, 0, 0),
            2,
            cv2.LINE_AA,
        )
    path = out / "preview.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return path


def model_card(r: dict[str, Any], model_id: str, n_train: int, n_val: int) -> str:
    p, v, d = r["params"], r["vae"], r["dit"]
    n_vessel = p.get("vessel_tiles", 0)
    hv = v["metrics"]["held_out"]
    lines = [
        f"# {model_id}",
        "",
        "A small latent-diffusion engine for seam inpainting, trained from scratch on the CPU by "
        "`scripts/train_default_engine.py` with histosynth's own trainers. It is *not* PixCell: "
        "a few million parameters trained for about an hour on two CPU cores, mostly on one "
        "H&E image.",
        "",
        "## Data and licences",
        "",
        *[f"- {source}." for source in r["sources"]],
        f"- Training: rows 0–499 of the first ({n_train} tiles of {p['tile']}², padded by "
        f"reflection to {p['tile']} rows: {n_train - n_vessel} in the 8 flips/rotations and "
        f"{n_vessel} with 1–2 vessels painted in from real crops of these rows, as the "
        "demo's donors are made; the autoencoder on random "
        f"{p['vae_crop']}² crops of these rows and of every other source). Held out: rows "
        f"500–999 ({n_val} tiles for the denoiser's "
        "validation loss; the whole half for the autoencoder metrics).",
        "",
        "## Architecture",
        "",
        f"- VAE: diffusers `AutoencoderKL`, blocks {list(p['vae_blocks'])}, 1 layer per block, "
        f"×{2 ** (len(p['vae_blocks']) - 1)} down, 16 latent channels, SD3 scale/shift with "
        f"per-channel latent normalisation folded into quant_conv; {r['parameters']['vae']:,} "
        "parameters.",
        f"- Denoiser: `PixCellTransformer2DModel`, {p['dit_layers']} blocks, "
        f"{p['dit_heads']}×{p['dit_head_dim']} heads, patch {p['patch']}, KV-compression "
        f"R={r['kv_compress']} on blocks {r['kv_compress_blocks']}; "
        f"{r['parameters']['transformer']:,} parameters.",
        f"- Condition: `TinyEncoder` (seeded fixed projection of colour/texture statistics, "
        f"dim {p['dim']}, one row per {p['crop']}² crop); {r['parameters']['encoder']:,} values.",
        "- Sizes (safetensors): " + ", ".join(f"{k} {val:.2f} MB" for k, val in r["sizes"].items()),
        "",
        "## Training",
        "",
        f"- Autoencoder: {v['steps']} steps, batch {p['vae_batch']}, AdamW lr {p['vae_lr']} "
        "linearly to 10 %, L1 + 0.5 gradient-L1 + 1e-6 KL.",
        f"- Denoiser: {d['steps']} steps, batch {p['dit_batch']}, AdamW lr {p['dit_lr']} "
        f"constant, ε-MSE with Min-SNR-γ 5, timesteps 0–559, CFG dropout 0.1; the EMA "
        f"weights (decay {p['ema_decay']}) are shipped, stored as float16.",
        "- Wall times (s): " + ", ".join(f"{k} {val:.0f}" for k, val in r["times"].items()),
        "",
        "## Results (held out)",
        "",
        f"- Autoencoder on rows 500–999: PSNR {hv['psnr']:.2f} dB, HF ratio "
        f"{hv['hf_ratio']:.3f}, mean abs error {hv['mean_abs_error']:.4f} "
        f"(untrained: PSNR {v['metrics']['held_out_untrained']['psnr']:.2f} dB).",
        "- Autoencoder loss (step: loss): "
        + ", ".join(f"{h['step']}: {h['loss']:.4f}" for h in v["history"]),
        "- Denoiser validation loss (plain ε-MSE on the held-out tiles, 4 timestep bins): "
        + ", ".join(f"{h['step']}: {h['val_loss']:.4f}" for h in d["validation"]),
        f"  (before training: {d['initial'].get('val_loss', float('nan')):.4f})",
        "- Loss curves: `loss_curves.png`. Denoiser training loss (step: loss): "
        + ", ".join(f"{s}: {val}" for s, val in d["train_loss"]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
