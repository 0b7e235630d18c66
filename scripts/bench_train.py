"""Benchmark: training throughput, the seed's Table 6 as a cumulative ablation in one run.

Full-parameter fine-tuning of the PixCell denoiser (AdamW, forward + backward + step, as
the trainer's loop: ``histosynth.synthesis.training.loop``) under five configurations,
each adding one optimisation to the one before:

1. **on-the-fly baseline** — every sample is encoded at every read (VAE posterior and
   conditioning rows: ``OnTheFlyDataset``), float32, the stock attention processors
   (diffusers' ``AttnProcessor2_0`` = PyTorch SDPA), eager;
2. **+ cache** — the samples come from the HDF5 feature cache (``CacheDataset``; the
   VAE and the encoder leave the training process: on CUDA they are moved off the GPU);
3. **+ KV-compression R = 2** — on the second half of the blocks (14–27 of 28 at real size);
4. **+ memory-efficient attention + mixed precision** — xFormers on CUDA when installed,
   else PyTorch SDPA (then the attention part changes nothing against the baseline, and
   the output says so); fp16 autocast on CUDA (as the seed), bf16 on the CPU (fp16
   autocast needs CUDA; the trainer refuses it there);
5. **+ torch.compile** — ``model.compile()`` as ``TrainConfig(compile=True)`` does; row 5
   is the seed's last row (compile + xFormers + fp16 together, ×9.06).

A sixth row, **ControlNet** (issue 29), trains a vessel-mask ControlNet of a quarter of
the base's blocks (7 of 28 at real size; 1 of the tiny 2) on the frozen base, as ``histosynth
train controlnet`` does (``ControlledTransformer``, masks with dropout), under the
attention row's settings (cache, KV-compression, attention, mixed precision; eager): its
images/s and peak memory against full fine-tuning under the same settings.

Every configuration trains a freshly built transformer with the same seed, batch size and
samples (the trainer's seeded data order and per-sample noise), runs ``--warmup`` steps
that are not timed (compile needs several), then times ``--steps`` optimiser steps:
images/s = samples per second, the data share of the step time, peak memory (CUDA:
``torch.cuda.max_memory_allocated`` after a reset at the start of the configuration,
weights, optimiser state and — in the baseline — the resident VAE and encoder included;
CPU: the growth of the process's resident set, sampled every 5 ms) and the ratio to the
baseline measured in the same run.

Sizes. ``tiny`` (the CPU default): the UNTRAINED tiny engine's components at 256² (2
blocks, hidden 64, the tiny VAE and encoder) — it shows the workflow and the relative
data cost, its numbers are not comparable to the GPU benchmark. ``pixcell-1024`` (the
CUDA default): the real architectures with random weights — PixCell-1024's transformer
(28 blocks, hidden 1152, 16 heads, 16 UNI tokens × 1536, ``sample_size`` 128; float32
weights, trained with autocast), SD3.5's VAE and UNI2-h (both bfloat16 on CUDA, the
engine's inference dtype there) at 1024². Speed does not depend on the weights' values.

Pixels: TIAToolbox's bundled H&E image (1000×1000, ``he_source_image``). Tiles smaller
than it are crops on a regular grid; larger ones (1024²) are the image reflect-padded by
12 px on each side (numpy ``mode="reflect"``). Tile *k* is crop *k mod crops* under the
*(k // crops) mod 8*-th of the eight rotations / flips, so tiles differ. Masks: the pale,
unsaturated pixels (mean > 0.8, saturation < 0.18), as the README's stand-in vessel model.

    python scripts/bench_train.py [--quick] [--size tiny|pixcell-1024|auto] [--device cuda]
        [--steps N] [--warmup N] [--batch-size B] [--out results.json]
        [--sections baseline,cache,kv,attention,compile,controlnet]

``--sections`` runs a subset; the options stay cumulative (``compile`` alone still has the
cache, KV-compression, attention and mixed precision), and ratios need ``baseline``. On the
CPU ``--quick`` takes about 40 s once inductor's cache is warm; the first compile on a
machine adds about a minute of C++ builds (leave ``compile`` out of ``--sections`` to skip
it). GPU
goal (the training issue) at 1024²: ≥ 12× the on-the-fly baseline and ≥ 7.7 img/s on one
H100 (seed: ×9.06, 2.56 img/s on an A100); the script prints whether it was met and
asserts nothing. Not a unit test: timings vary from machine to machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histosynth.common.files import atomic_write_text
from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.cache import CacheDataset, CacheTile, OnTheFlyDataset, build_cache
from histosynth.synthesis.engine import (
    make_scheduler,
    set_attention,
    tiny_engine,
    tiny_transformer_config,
)
from histosynth.synthesis.models.controlnet import PixCellControlNet
from histosynth.synthesis.models.kv_compression import enable_kv_compression
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.models.vae import LatentCodec
from histosynth.synthesis.pipelines.control import ControlledTransformer
from histosynth.synthesis.training.config import TrainConfig
from histosynth.synthesis.training.data import collate, sample_generator, step_indices
from histosynth.synthesis.training.loop import (
    _draw,
    diffusion_loss,
    make_accelerator,
    trainable_parameters,
)

SECTIONS = ("baseline", "cache", "kv", "attention", "compile", "controlnet")
"""The configurations, in the cumulative order of the seed's Table 6."""

SEED_A100 = {"baseline": 0.28, "cache": 0.35, "kv": 0.41, "compile": 2.56}
"""The dissertation's images/s on one A100 at 1024² (compile row = compile + xFormers + fp16)."""
SEED_FINAL_RATIO = 9.06
SEED_PEAK_GB = (48.2, 32.7)
GOAL_RATIO = 12.0
GOAL_IMAGES_PER_S = 7.7
SEED = 0
MPP = 0.5
TRAIN = {"lr": 1e-6, "snr_gamma": 5.0, "uncond_prob": 0.1, "max_grad_norm": 1.0}
"""Full fine-tuning recipe (engine-facts.md: AdamW, constant lr 1e-6, Min-SNR-γ, CFG dropout)."""


# --------------------------------------------------------------------------- small helpers


def _bench_engine() -> Any:
    """``scripts/bench_engine.py`` as a module (the real-size configs live there)."""
    path = Path(__file__).resolve().with_name("bench_engine.py")
    spec = importlib.util.spec_from_file_location("histosynth_bench_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class RssPeak:
    """Growth of this process's resident set over a ``with`` block, MB (sampled)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> RssPeak:
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


# --------------------------------------------------------------------------- tiles


def he_tiles(size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` uint8 RGB tiles of ``size``² px from TIAToolbox's H&E image, with masks.

    Smaller than the image: crops on a regular grid (corners included); larger: the image
    reflect-padded to ``size``. Tile ``k`` is crop ``k mod crops`` under the
    ``(k // crops) mod 8``-th rotation / flip. Masks (0 / 255): pale, unsaturated pixels.
    """
    image = he_source_image()
    h, w = image.shape[:2]
    if size > min(h, w):
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        image = np.pad(
            image,
            ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
            mode="reflect",
        )
        h, w = image.shape[:2]
    per_side = max(1, min(h, w) // size + (1 if min(h, w) % size else 0))
    offsets = np.linspace(0, min(h, w) - size, per_side).round().astype(int).tolist()
    crops = [image[y : y + size, x : x + size] for y in offsets for x in offsets]
    out = []
    for k in range(count):
        crop = crops[k % len(crops)]
        turn = (k // len(crops)) % 8
        tile = np.rot90(crop, turn % 4)
        tile = np.ascontiguousarray(tile[:, ::-1] if turn >= 4 else tile)
        rgb = tile.astype(np.float32) / 255
        top = rgb.max(-1)
        saturation = 1 - rgb.min(-1) / np.maximum(top, 1e-6)
        mask = ((rgb.mean(-1) > 0.8) & (saturation < 0.18)).astype(np.uint8) * 255
        out.append((tile, mask))
    return out


# --------------------------------------------------------------------------- the models


@dataclass
class Models:
    """The frozen encoders and a builder of fresh transformers (same seed each time)."""

    vae: Any
    encoder: Any
    build_transformer: Callable[[], PixCellTransformer2DModel]
    description: str
    encoder_dtype: torch.dtype
    transformer_config: dict[str, Any] = field(default_factory=dict)


def _seeded(build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def tiny_models(device: torch.device, resolution: int) -> Models:
    """The UNTRAINED tiny engine's VAE and encoder; its transformer config (float32)."""
    engine = tiny_engine(resolution, device=device, dtype=torch.float32)
    config = tiny_transformer_config(resolution)

    def build() -> PixCellTransformer2DModel:
        model = _seeded(lambda: PixCellTransformer2DModel.from_config(config))
        return torch.nn.Module.to(model, device, torch.float32)

    return Models(
        vae=engine.vae,
        encoder=engine.encoder,
        build_transformer=build,
        description=(
            f"tiny preset (UNTRAINED, not comparable to the GPU benchmark): transformer "
            f"{config['num_layers']} blocks, hidden "
            f"{config['num_attention_heads'] * config['attention_head_dim']}; tiny VAE and "
            f"encoder, float32"
        ),
        encoder_dtype=torch.float32,
        transformer_config=config,
    )


def pixcell_models(device: torch.device, resolution: int) -> Models:
    """PixCell-1024's transformer, SD3.5's VAE and UNI2-h: real architectures, random weights.

    At a ``resolution`` other than 1024 (a smoke setting) the latent grid follows it and
    the UNI crop is ``resolution / 4``, so the condition keeps its 4×4 grid of 16 rows.
    """
    from diffusers import AutoencoderKL

    from histosynth.synthesis.models.encoders import UNIEncoder, create_uni2h

    engine_bench = _bench_engine()
    config = dict(engine_bench.PIXCELL_1024_CONFIG)
    if resolution != 1024:
        side = resolution // 8
        config.update(sample_size=side, interpolation_scale=side / 64)
    encoder_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def build() -> PixCellTransformer2DModel:
        def make() -> PixCellTransformer2DModel:
            with torch.device(device):
                return PixCellTransformer2DModel(**config)

        return torch.nn.Module.to(_seeded(make), device, torch.float32)

    def build_vae() -> Any:
        with torch.device(device):
            return AutoencoderKL(**engine_bench.SD35_VAE_CONFIG)

    vae = torch.nn.Module.to(_seeded(build_vae), device, encoder_dtype)
    vae.eval().requires_grad_(False)
    uni = _seeded(lambda: create_uni2h(device=device))
    encoder = UNIEncoder(uni, crop=resolution // 4).to(device, encoder_dtype)
    dtype_name = str(encoder_dtype).removeprefix("torch.")
    return Models(
        vae=vae,
        encoder=encoder,
        build_transformer=build,
        description=(
            f"PixCell-1024 architecture, random weights: transformer 28 blocks, hidden 1152, "
            f"float32 weights; SD3.5 VAE and UNI2-h in {dtype_name}"
        ),
        encoder_dtype=encoder_dtype,
        transformer_config=config,
    )


# --------------------------------------------------------------------------- one configuration


@dataclass(frozen=True)
class Plan:
    """What a configuration turns on (cumulative)."""

    name: str
    label: str
    cached: bool
    kv: int
    attention: str
    mixed_precision: str
    compiled: bool
    controlnet: int = 0  # > 0: a ControlNet of that many blocks trains, the base frozen


def plans(attention: str, mixed_precision: str, blocks: int = 28) -> list[Plan]:
    """The five cumulative configurations, ``attention`` / ``mixed_precision`` being the
    memory-efficient attention and the autocast dtype this device gets, and the ControlNet
    row: a quarter of the base's ``blocks`` copied (7 of PixCell's 28), the base frozen,
    the settings of the attention row (eager)."""
    mp = {"fp16": "fp16", "bf16": "bf16"}[mixed_precision]
    return [
        Plan("baseline", "on-the-fly baseline", False, 1, "sdpa", "no", False),
        Plan("cache", "+ cache", True, 1, "sdpa", "no", False),
        Plan("kv", "+ KV-compression R=2", True, 2, "sdpa", "no", False),
        Plan("attention", f"+ mem-eff. attention ({attention}) + {mp}", True, 2, attention, mp,
             False),
        Plan("compile", "+ torch.compile", True, 2, attention, mp, True),
        Plan("controlnet", f"ControlNet {max(1, blocks // 4)} blocks, base frozen (as "
             "attention row)", True, 2, attention, mp, False, max(1, blocks // 4)),
    ]


class _Training:
    """A fresh transformer under a plan, its optimiser and accelerator: the trainer's step.

    The step is ``run_training``'s: seeded samples drawn with ``_draw``, ``collate``,
    ``diffusion_loss`` (Min-SNR-γ, CFG dropout to the learned null rows),
    ``accelerator.backward``, gradient clipping, the AdamW step, ``zero_grad``.
    """

    def __init__(
        self,
        plan: Plan,
        data: Any,
        models: Models,
        config: TrainConfig,
        device: torch.device,
        train_indices: list[int],
        compile_mode: str,
    ) -> None:
        self.data, self.config, self.train_indices = data, config, train_indices
        model = models.build_transformer()
        if plan.kv > 1:
            enable_kv_compression(model, ratio=plan.kv)
        self.attention = set_attention(model, plan.attention)
        model.requires_grad_(True).train()
        self.mask_dropout = None
        if plan.controlnet:  # the trainer's ControlNet path: train_controlnet's model
            model.requires_grad_(False)
            controlnet = _seeded(lambda: PixCellControlNet.from_transformer(
                model, num_layers=plan.controlnet,
                vae_scale_factor=LatentCodec(models.vae).downsample,
                mask_encoder_channels=(16, 32, 96, 256)[: 1 + int(
                    math.log2(LatentCodec(models.vae).downsample))],
            ))
            controlnet.requires_grad_(True).train()
            model, self.mask_dropout = ControlledTransformer(model, controlnet), 0.1
        self.accelerator = make_accelerator(config, device)
        model.to(self.accelerator.device)
        self.params = list(trainable_parameters(model).values())
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
            eps=config.adam_epsilon,
        )
        if plan.compiled:
            model.compile(mode=compile_mode)
        self.model = model
        self.prepared, self.optimizer = self.accelerator.prepare(model, optimizer)
        unwrapped = self.accelerator.unwrap_model(self.prepared)
        self.null_rows = unwrapped.caption_projection.uncond_embedding.detach().float().cpu()
        self.scheduler = make_scheduler("ddpm")
        self.prepared.train()

    def step(self, index: int) -> tuple[float, float, bool]:
        """Optimiser step ``index``: (data seconds, loss, skipped by the fp16 loss scaler)."""
        config, accelerator = self.config, self.accelerator
        t0 = time.perf_counter()
        picks = step_indices(
            self.train_indices, seed=config.seed, step=index, micro=0,
            batch_size=config.batch_size, grad_accum=1, processes=1, rank=0,
        )
        draws = [
            _draw(
                self.data,
                i,
                sample_generator(config.seed, "train", epoch, pos),
                timestep_range=config.timestep_range,
                uncond_prob=config.uncond_prob,
                mask_dropout=self.mask_dropout,
            )
            for i, epoch, pos in picks
        ]
        batch = collate(draws)
        data_s = time.perf_counter() - t0
        with accelerator.accumulate(self.prepared):
            losses = diffusion_loss(
                self.prepared, batch, self.scheduler, snr_gamma=config.snr_gamma,
                null_rows=self.null_rows,
            )
            loss = losses.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach().double().cpu())  # the trainer reads the loss each step
        return data_s, value, bool(accelerator.optimizer_step_was_skipped)

    def close(self) -> None:
        """Back to eager (``nn.Module.compile`` sets only ``_compiled_call_impl``)."""
        self.model._compiled_call_impl = None


def run_plan(
    plan: Plan,
    data: Any,
    models: Models,
    *,
    device: torch.device,
    batch_size: int,
    warmup: int,
    steps: int,
    train_indices: list[int],
    gradient_checkpointing: bool,
    compile_mode: str,
) -> dict[str, Any]:
    """Train a fresh transformer under ``plan`` for ``warmup`` + ``steps`` steps; return the
    measured row (a failure, e.g. out of memory, is a row with its ``status``)."""
    row: dict[str, Any] = {
        "name": plan.name,
        "label": plan.label,
        "data": "cache" if plan.cached else "on-the-fly",
        "kv": plan.kv,
        "attention": plan.attention,
        "mixed_precision": plan.mixed_precision,
        "compiled": plan.compiled,
        "batch_size": batch_size,
        "warmup_steps": warmup,
        "timed_steps": steps,
    }
    config = TrainConfig(
        steps=warmup + steps,
        batch_size=batch_size,
        lr=TRAIN["lr"],
        mixed_precision=plan.mixed_precision,  # type: ignore[arg-type]
        uncond_prob=TRAIN["uncond_prob"],
        snr_gamma=TRAIN["snr_gamma"],
        max_grad_norm=TRAIN["max_grad_norm"],
        kv_compress=plan.kv,
        compile=plan.compiled,
        attention=plan.attention,
        gradient_checkpointing=gradient_checkpointing,
        seed=SEED,
    )
    training: _Training | None = None
    _release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = RssPeak() if device.type == "cpu" else contextlib.nullcontext()
    try:
        with rss:
            begin = time.perf_counter()
            training = _Training(plan, data, models, config, device, train_indices,
                                 compile_mode)
            row["attention"] = training.attention
            row["parameters"] = sum(p.numel() for p in training.params)
            row["setup_s"] = time.perf_counter() - begin
            warm_times = []
            for index in range(warmup):
                t0 = time.perf_counter()
                training.step(index)
                _sync(device)
                warm_times.append(time.perf_counter() - t0)
            row["warmup_s"] = warm_times
            if plan.compiled and warm_times:
                row["first_step_s"] = warm_times[0]  # includes compiling forward + backward
            _sync(device)
            data_s, skipped, losses, marks = 0.0, 0, [], []
            t_start = time.perf_counter()
            for index in range(warmup, warmup + steps):
                d, value, was_skipped = training.step(index)
                marks.append(time.perf_counter())  # the loss read synchronises each step
                data_s += d
                skipped += was_skipped
                losses.append(value)
            _sync(device)
            seconds = time.perf_counter() - t_start
        row.update(
            status="ok",
            seconds=seconds,
            step_s=seconds / steps,
            step_times_s=[b - a for a, b in zip([t_start, *marks], marks, strict=False)],
            images_per_s=batch_size * steps / seconds,
            data_share=data_s / seconds if seconds > 0 else None,
            loss_last=losses[-1],
            loss_finite=all(math.isfinite(v) for v in losses),
            scaler_skipped_steps=skipped,
        )
    except Exception as err:  # OOM or a backend failure is a result, not a crash
        row["status"] = "OOM" if _is_oom(err) else f"error: {_short(err)}"
    finally:
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        elif isinstance(rss, RssPeak):
            row["peak_rss_delta_mb"] = rss.delta_mb
        if training is not None:
            training.close()
        training = None
        if plan.compiled:
            from torch import _dynamo

            _dynamo.reset()
        _release(device)
    return row


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _memory_text(row: dict[str, Any]) -> str:
    if "peak_gb" in row:
        return f"{row['peak_gb']:.2f} GB"
    if "peak_rss_delta_mb" in row:
        return f"RSS +{row['peak_rss_delta_mb']:.0f} MB"
    return "n/a"


def _seed_text(name: str) -> str:
    value = SEED_A100.get(name)
    if value is None:
        return "— (in the next row)"
    ratio = SEED_FINAL_RATIO if name == "compile" else value / SEED_A100["baseline"]
    return f"{value:.2f} (×{ratio:.2f})"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the measured configurations."""
    head = ["configuration", "data", "KV", "attention", "precision", "compile", "img/s",
            "× baseline", "× previous", "data share", "peak memory", "seed A100 img/s (×)"]
    body = []
    for row in rows:
        ok = row.get("status") == "ok"
        body.append([
            row["label"],
            row["data"],
            "off" if row["kv"] == 1 else f"R={row['kv']}",
            row["attention"],
            "fp32" if row["mixed_precision"] == "no" else row["mixed_precision"],
            "on" if row["compiled"] else "off",
            _fmt(row.get("images_per_s"), ".3f") if ok else row.get("status", "?")[:40],
            _fmt(row.get("ratio"), ".2f", "-"),
            _fmt(row.get("ratio_previous"), ".2f", "-"),
            _fmt(row.get("data_share"), ".0%", "-"),
            _memory_text(row),
            _seed_text(row["name"]),
        ])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    right = {6, 7, 8, 9, 10}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)
    ) + "|"
    return [line(head), rule, *(line(r) for r in body)]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio`` (to the baseline of this run) and ``ratio_previous`` on each measured row."""
    base = next((r for r in rows if r["name"] == "baseline" and r.get("status") == "ok"), None)
    previous = None
    for row in rows:
        if row.get("status") != "ok":
            previous = None
            continue
        if base is not None:
            row["ratio"] = 1.0 if row is base else row["images_per_s"] / base["images_per_s"]
        if previous is not None:
            row["ratio_previous"] = row["images_per_s"] / previous["images_per_s"]
        previous = row


def goal_check(rows: list[dict[str, Any]], device_name: str, size: str,
               resolution: int) -> dict[str, Any]:
    """The issue's GPU goal against the last measured cumulative configuration (the
    ControlNet row is not one of them; nothing asserted)."""
    final = next(
        (r for r in reversed(rows) if r.get("status") == "ok" and r["name"] != "controlnet"),
        None,
    )
    out: dict[str, Any] = {"ratio_goal": GOAL_RATIO, "images_per_s_goal": GOAL_IMAGES_PER_S,
                           "stated_for": "one H100 at 1024², PixCell-1024"}
    if final is None or "ratio" not in final:
        out["evaluated"] = False
        out["reason"] = "no baseline and final configuration measured"
        return out
    out.update(configuration=final["label"], ratio=final["ratio"],
               images_per_s=final["images_per_s"])
    if size != "pixcell-1024" or resolution != 1024 or "cuda" not in device_name:
        out["evaluated"] = False
        out["reason"] = "the goal is for the real size at 1024² on a GPU"
        return out
    out["evaluated"] = True
    out["ratio_met"] = final["ratio"] >= GOAL_RATIO
    out["images_per_s_met"] = final["images_per_s"] >= GOAL_IMAGES_PER_S
    out["met"] = bool(out["ratio_met"] and out["images_per_s_met"])
    out["all_five_configurations"] = final["name"] == "compile"
    return out


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        return (f"cuda: {torch.cuda.get_device_name(index)} "
                f"({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}"


def _parse_sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad or not chosen:
        raise SystemExit(f"--sections: unknown {bad}; expected some of {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]


@contextlib.contextmanager
def _cache_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        yield Path(tmp)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and tiles")
    parser.add_argument("--size", choices=("tiny", "pixcell-1024", "auto"), default="auto",
                        help="model size (auto: pixcell-1024 on CUDA, tiny on the CPU)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="tile side, px (tiny 256, pixcell-1024 1024; others: smoke runs)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per step (tiny: 2 quick / 4; pixcell-1024: 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimiser steps per configuration (quick 3 / 10 tiny, "
                             "5 / 20 pixcell-1024)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (quick 2 / 3 tiny, 3 / 5 pixcell-1024)")
    parser.add_argument("--tiles", type=int, default=None,
                        help="tiles in the dataset (default: 2 batches' worth)")
    parser.add_argument("--mixed-precision", choices=("auto", "fp16", "bf16"), default="auto",
                        help="autocast of rows 4-5 (auto: fp16 on CUDA, bf16 on the CPU)")
    parser.add_argument("--attention", choices=("auto", "sdpa", "xformers"), default="auto",
                        help="attention of rows 4-5 (auto: xformers on CUDA when installed)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, reduce-overhead, max-autotune)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="in every configuration (to fit a larger batch)")
    parser.add_argument("--preload", action="store_true",
                        help="preload the cache into RAM (default: read HDF5 per sample)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS)} (options stay cumulative)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the feature cache is built (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write all numbers as JSON")
    return parser


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """Run the ablation; print the table and the goal line; return (and optionally write)
    every number as a JSON-ready dict."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    sections = _parse_sections(args.sections)
    started = time.perf_counter()
    cuda_ok = torch.cuda.is_available()
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if cuda_ok else "cpu")
    if device.type == "cuda" and not cuda_ok:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    size = args.size if args.size != "auto" else ("pixcell-1024" if device.type == "cuda"
                                                  else "tiny")
    real = size == "pixcell-1024"
    quick = bool(args.quick)
    resolution = args.resolution or (1024 if real else 256)
    batch_size = args.batch_size or (4 if real else (2 if quick else 4))
    steps = args.steps or ((5 if quick else 20) if real else (3 if quick else 10))
    warmup = args.warmup if args.warmup is not None else (
        (3 if quick else 5) if real else (2 if quick else 3))
    tiles_n = args.tiles or 2 * batch_size
    if min(batch_size, steps, tiles_n) < 1 or warmup < 0:
        raise SystemExit("--batch-size, --steps and --tiles must be >= 1, --warmup >= 0")
    notes: list[str] = []

    from diffusers.utils import is_xformers_available

    xformers_ok = is_xformers_available() and device.type == "cuda"
    attention = args.attention
    if attention == "auto":
        attention = "xformers" if xformers_ok else "sdpa"
    if attention == "xformers" and not xformers_ok:
        raise SystemExit("--attention xformers: xFormers is not installed or this is no CUDA "
                         "device")
    if attention == "sdpa":
        why = "xFormers is not installed" if not is_xformers_available() else "no CUDA device"
        notes.append(f"memory-efficient attention: PyTorch SDPA ({why}); the baseline's stock "
                     "processor is SDPA too, so row 4 changes only the precision")
    else:
        notes.append("memory-efficient attention: xFormers (KV-compressed blocks keep their "
                     "own SDPA processor)")
    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = "fp16" if device.type == "cuda" else "bf16"
    if mixed == "fp16" and device.type != "cuda":
        raise SystemExit("--mixed-precision fp16 needs CUDA (use bf16 on the CPU)")
    if device.type == "cpu":
        notes.append("mixed precision: bf16 autocast on the CPU (fp16 autocast is not "
                     "supported there; the seed used fp16 on an A100)")
    if device.type == "cuda":
        notes.append(f"float32 rows: TF32 matmul "
                     f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (torch "
                     f"default), cuDNN TF32 "
                     f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    blocks = 28 if real else int(tiny_transformer_config(resolution).get("num_layers", 2))
    all_plans = plans(attention, mixed, blocks)
    chosen = [p for p in all_plans if p.name in sections]

    print(f"device: {_describe_device(device)}")
    if not real:
        print("size: tiny preset (UNTRAINED); numbers are not comparable to the GPU benchmark"
              + ("" if cuda_ok else " (no CUDA device)"))
    begin = time.perf_counter()
    models = pixcell_models(device, resolution) if real else tiny_models(device, resolution)
    print(f"models: {models.description}; built in {time.perf_counter() - begin:.1f} s")
    print(f"training: full-parameter AdamW (lr {TRAIN['lr']:g}), {resolution}² tiles, batch "
          f"{batch_size}, {warmup} warm-up + {steps} timed steps per configuration, "
          f"{tiles_n} tiles")

    result: dict[str, Any] = {
        "device": _describe_device(device),
        "size": size,
        "models": models.description,
        "resolution": resolution,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "tiles": tiles_n,
        "attention": attention,
        "mixed_precision": mixed,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "sections": sections,
        "transformer_config": models.transformer_config,
        "pixels": ("TIAToolbox target_image.png (1000², he_source_image): grid crops below "
                   "1000 px, reflect padding above; 8 rotations / flips"),
    }
    tiles = he_tiles(resolution, tiles_n)
    train_indices = list(range(tiles_n))
    codec = LatentCodec(models.vae)
    rows: list[dict[str, Any]] = []
    with _cache_dir(args.cache_dir) as folder:
        cache_path = folder / f"bench-{size}-{resolution}.h5"
        if cache_path.exists():
            cache_path.unlink()
        cache_info: dict[str, Any] = {}
        if any(p.cached for p in chosen):
            _sync(device)
            begin = time.perf_counter()
            info = build_cache(
                cache_path,
                [CacheTile(f"he-{k:04d}", image, mask, source="tiatoolbox:target_image.png")
                 for k, (image, mask) in enumerate(tiles)],
                codec=codec, encoder=models.encoder, tile_size=resolution, mpp=MPP,
                batch_size=min(8, tiles_n),
            )
            _sync(device)
            build_s = time.perf_counter() - begin
            cache_info = {"build_s": build_s, "per_tile_s": build_s / tiles_n,
                          "bytes": cache_path.stat().st_size, "samples": info.count,
                          "rows": info.rows, "dim": info.dim}
            print(f"cache: {info.count} tiles encoded in {build_s:.1f} s "
                  f"({build_s / tiles_n * 1e3:.0f} ms per tile, once), "
                  f"{cache_path.stat().st_size / 2**20:.1f} MiB")
        result["cache"] = cache_info
        common = {
            "models": models, "device": device, "batch_size": batch_size, "warmup": warmup,
            "steps": steps, "train_indices": train_indices,
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "compile_mode": args.compile_mode,
        }
        for plan in chosen:
            if plan.cached:
                if device.type == "cuda" and models.vae.device.type == "cuda":
                    models.vae.to("cpu")  # the cache takes the encoders out of training
                    models.encoder.to("cpu")
                    _release(device)
                data: Any = CacheDataset(cache_path, preload=bool(args.preload), seed=SEED)
            else:
                data = OnTheFlyDataset(
                    [t for t, _ in tiles], [m for _, m in tiles], codec=codec,
                    encoder=models.encoder, tile_ids=[f"he-{k:04d}" for k in range(tiles_n)],
                    seed=SEED,
                )
            print(f"[{plan.name}] {plan.label} ...", flush=True)
            row = run_plan(plan, data, **common)
            rows.append(row)
            if row["status"] != "ok":
                print(f"  {row['status']}")
                if plan.compiled:
                    notes.append(f"torch.compile: {row['status']}")
            del data
    add_ratios(rows)

    print(f"\nTraining throughput, cumulative ablation ({size}, {resolution}², batch "
          f"{batch_size}, {steps} timed steps after {warmup} warm-up)"
          + ("" if real else " — tiny preset: not comparable to the GPU benchmark"))
    for line in table_lines(rows):
        print(line)
    print(f"seed (dissertation, one A100, 1024²): peak memory {SEED_PEAK_GB[0]} GB → "
          f"{SEED_PEAK_GB[1]} GB; its last row is compile + xFormers + fp16 together")
    if device.type == "cpu":
        print("peak memory on the CPU: growth of the resident set over the configuration "
              "(sampled every 5 ms), not the allocator's peak")
    goal = goal_check(rows, str(device), size, resolution)
    result["goal"] = goal
    if goal.get("evaluated"):
        name = torch.cuda.get_device_name(device)
        where = "" if "H100" in name else f" (this GPU: {name}; the goal is stated for an H100)"
        print(f"goal: ≥ {GOAL_RATIO:g}× the on-the-fly baseline and ≥ {GOAL_IMAGES_PER_S:g} img/s "
              f"on one H100 at 1024²{where}; last row ({goal['configuration']}): "
              f"×{goal['ratio']:.2f} "
              f"({'met' if goal['ratio_met'] else 'NOT met'}), "
              f"{goal['images_per_s']:.2f} img/s "
              f"({'met' if goal['images_per_s_met'] else 'NOT met'}) → "
              f"{'MET' if goal['met'] else 'NOT MET'}")
    else:
        print(f"goal (≥ {GOAL_RATIO:g}× and ≥ {GOAL_IMAGES_PER_S:g} img/s on one H100 at 1024², "
              f"PixCell-1024): not evaluated — {goal.get('reason')}")
    for note in notes:
        print(f"note: {note}")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    result.update(rows=rows, notes=notes, total_seconds=total,
                  seed_a100={"images_per_s": SEED_A100, "final_ratio": SEED_FINAL_RATIO,
                             "peak_gb": list(SEED_PEAK_GB)})
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=_json_default) + "\n")
        print(f"wrote {args.out}")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main(sys.argv[1:])
