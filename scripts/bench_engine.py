"""Benchmark: the PixCell-1024 engine at real size with random weights (bf16 on CUDA).

Measures, in one run, so every comparison is a ratio of numbers taken side by side:

* denoiser forward time, model FLOP utilisation (MFU = analytic FLOPs / time / peak) and
  peak memory for batch {1, 8} × resolution {1024², 2048²} × KV-compression {off, R = 2};
* images/s end to end at 1024² (``VariationPipeline`` with UNI rows as input: 20
  DPM-Solver++ steps, CFG = one forward of 2B per step, VAE decode), batch 1 and 8;
* attention SDPA vs xFormers (when xFormers imports), ``torch.compile`` off vs on;
* optionally UNI2-h's forward at real size (not part of the denoising loop);
* the analytic FLOP count of the real PixCell-1024 transformer (checked against torch's
  ``FlopCounterMode`` on the meta device) and the KV-compression saving.

The models are the real architectures with random initialisation: ``PixCellTransformer2DModel``
from PixCell-1024's ``transformer/config.json`` and an ``AutoencoderKL`` from SD3.5's
``vae/config.json`` (both written below); speed does not depend on the weights' values.
Without a CUDA device (or with ``--device cpu`` / ``--tiny``) the script runs the same
table on the UNTRAINED ``tiny`` preset in float32 and says that those numbers are not
comparable; the analytic FLOPs of the real model are printed either way.

    python scripts/bench_engine.py [--quick] [--device cuda] [--out results.json]
        [--peak-tflops 989] [--sections flops,forward,e2e,attention,compile,uni]

On an H100 the full run takes several minutes, most of it ``torch.compile`` (one compile per
batch shape and KV setting); ``--quick`` or ``--sections`` split it (e.g. one run without
``compile``, one with ``--sections compile``). On the CPU the compile section is skipped
unless ``--cpu-compile`` is given (inductor's C++ build alone takes minutes).

FLOP convention: 2 FLOPs per multiply-accumulate; counted are the matrix products (linear
layers, the patch-embedding conv, attention QKᵀ and AV, the KV-compression conv), not
norms, softmax, activations or element-wise operations. Not a unit test: timings vary
from machine to machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from histosynth.common.files import atomic_write_text
from histosynth.synthesis.engine import load_engine, make_scheduler, set_attention
from histosynth.synthesis.models.kv_compression import (
    default_kv_compression_blocks,
    disable_kv_compression,
    enable_kv_compression,
)
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.models.vae import LatentCodec
from histosynth.synthesis.pipelines.variation import VariationPipeline

PIXCELL_1024_CONFIG: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 1536,
    "caption_num_tokens": 16,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 16,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 32,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
}
"""PixCell-1024's ``transformer/config.json`` (StonyBrook-CVLab/PixCell-1024), minus ``_`` keys."""

SD35_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
"""Mirrors ``vae/config.json`` of stabilityai/stable-diffusion-3.5-large (SD3's VAE)."""

H100_BF16_DENSE_TFLOPS = 989.0
"""H100 SXM dense bf16 peak, TFLOP/s (H200: the same tensor cores; A100: 312)."""

SECTIONS = ("flops", "forward", "e2e", "attention", "compile", "uni")
DOC_TFLOP_1024 = 6.4  # engine-facts.md: TFLOP per forward at 1024²
DOC_KV_SAVING_1024 = 0.13  # engine-facts.md: KV R=2 on blocks 14–27 at 1024²
DOC_KV_SAVING_4096 = 0.33


# --------------------------------------------------------------------------- FLOPs


def transformer_flop_terms(
    config: dict[str, Any],
    height: int,
    width: int,
    kv_ratio: int = 1,
    kv_blocks: Sequence[int] | None = None,
    downsample: int = 8,
) -> dict[str, float]:
    """FLOPs of one forward of one image, by part (2 FLOPs per multiply-accumulate).

    Args:
        config: a PixCell / PixArt transformer config (``num_layers``, heads, head dim,
            ``patch_size``, channels, ``caption_num_tokens`` / ``caption_channels``).
        height, width: image size, px (the latent is ``px / downsample``).
        kv_ratio: KV-compression ratio R (1 = off); compressed blocks attend to
            ⌊h/R⌋·⌊w/R⌋ keys instead of h·w.
        kv_blocks: the compressed blocks; ``None`` = the second half (14–27 of 28), as
            :func:`~histosynth.synthesis.models.kv_compression.enable_kv_compression`.

    Counted: linear layers, the patch-embedding conv, attention scores (QKᵀ) and values
    (AV), the depthwise KV-compression conv. Not counted: norms, softmax, activations,
    the sin-cos embeddings and other element-wise work. A batch of B costs B times this.
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    p = int(config["patch_size"])
    layers = int(config["num_layers"])
    c_in = int(config["in_channels"])
    c_out = int(config.get("out_channels") or c_in)
    tokens = int(config.get("caption_num_tokens", 1))
    caption = config.get("caption_channels")
    cross = int(config.get("cross_attention_dim") or d)
    h, w = height // downsample // p, width // downsample // p
    n = h * w
    if kv_ratio > 1:
        chosen = set(default_kv_compression_blocks(layers) if kv_blocks is None else kv_blocks)
    else:
        chosen = set()
    m_kv = (h // kv_ratio) * (w // kv_ratio) if kv_ratio > 1 else n
    keys = [m_kv if b in chosen else n for b in range(layers)]
    macs = {
        "patch_embed": n * c_in * p * p * d,
        # AdaLayerNormSingle: timestep MLP 256 → d → d, then d → 6d (once per image)
        "timestep_adaln": 256 * d + d * d + d * 6 * d,
        "uni_projection": tokens * (int(caption) * d + d * d) if caption else 0,
        "self_attn_qkv_out": layers * 4 * n * d * d,
        "self_attn_scores_values": sum(2 * n * m * d for m in keys),
        "kv_compression_conv": len(chosen) * 2 * m_kv * d * kv_ratio * kv_ratio,
        "cross_attn_qkv_out": layers * (2 * n * d * d + 2 * tokens * cross * d),
        "cross_attn_scores_values": layers * 2 * n * tokens * d,
        "mlp": layers * 2 * n * d * 4 * d,
        "proj_out": n * d * p * p * c_out,
    }
    return {k: 2.0 * v for k, v in macs.items()}


def transformer_flops(
    config: dict[str, Any],
    height: int,
    width: int,
    kv_ratio: int = 1,
    kv_blocks: Sequence[int] | None = None,
    downsample: int = 8,
) -> float:
    """Total FLOPs of one forward of one image at ``height`` × ``width`` px (see
    :func:`transformer_flop_terms` for the convention; PixCell-1024 at 1024²: ≈ 6.44e12)."""
    terms = transformer_flop_terms(config, height, width, kv_ratio, kv_blocks, downsample)
    return sum(terms.values())


def measured_transformer_flops(
    config: dict[str, Any], height: int, width: int, kv_ratio: int = 1, downsample: int = 8
) -> float:
    """FLOPs of one forward of one image as torch's ``FlopCounterMode`` counts them, on the
    meta device (shapes only: no memory, no arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = PixCellTransformer2DModel(**config)
    if kv_ratio > 1:
        enable_kv_compression(model, ratio=kv_ratio)
    p = downsample
    latents = torch.empty(1, model.config.in_channels, height // p, width // p, device="meta")
    rows = torch.empty(
        1, model.config.caption_num_tokens, model.config.caption_channels, device="meta"
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _forward(model, latents, rows, torch.full((1,), 500, device="meta"))
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- timing helpers


def _forward(model: Any, latents: torch.Tensor, rows: torch.Tensor, t: torch.Tensor) -> Any:
    return model(
        latents,
        encoder_hidden_states=rows,
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int
) -> tuple[list[float], float | None]:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls: (ms per call, peak GB).

    CUDA: ``torch.cuda.Event`` pairs around each call, peak = ``max_memory_allocated``
    over the timed calls (weights included). CPU: ``time.perf_counter``, peak ``None``.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        return times, peak
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return times, None


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def configure(model: PixCellTransformer2DModel, kv: int, attention: str) -> None:
    """KV-compression R = ``kv`` (1 = off) on the default blocks, then ``attention`` on
    every layer that is not compressed."""
    disable_kv_compression(model)
    if kv > 1:
        enable_kv_compression(model, ratio=kv)
    set_attention(model, attention)


# --------------------------------------------------------------------------- the bench


class Bench:
    """Models, settings and the rows measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cuda_ok = torch.cuda.is_available()
        requested = torch.device(args.device) if args.device else None
        if requested is None:
            requested = torch.device("cuda" if cuda_ok else "cpu")
        if requested.type == "cuda" and not cuda_ok:
            raise SystemExit("--device cuda: torch sees no CUDA device")
        self.device = requested
        self.tiny = bool(args.tiny) or self.device.type != "cuda"
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        quick = bool(args.quick)
        if self.tiny:
            self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
            self.resolutions = (256,) if quick else (256, 512)
            self.batches = (1, 2)
            self.warmup, self.iters = (1, 2) if quick else (2, 5)
            self.e2e_warmup, self.e2e_iters = (0, 1) if quick else (1, 2)
            self.tile = 256
        else:
            self.dtype = torch.bfloat16
            self.resolutions = (1024, 2048)
            self.batches = (1, 8)
            self.warmup, self.iters = (1, 3) if quick else (3, 10)
            self.e2e_warmup, self.e2e_iters = (1, 1) if quick else (1, 3)
            self.tile = 1024
        self.kvs = (1, 2)
        self.peak_tflops: float | None = args.peak_tflops
        if self.peak_tflops is None and not self.tiny:
            self.peak_tflops = H100_BF16_DENSE_TFLOPS
        self.transformer: PixCellTransformer2DModel
        self.vae: Any
        self.config: dict[str, Any]

    # -- setup

    def build(self) -> None:
        """The real-size random models (CUDA) or the tiny engine."""
        start = time.perf_counter()
        if self.tiny:
            engine = load_engine(
                "tiny", device=self.device, dtype=self.dtype, attention="sdpa",
                tile_size=self.tile,
            )
            self.transformer, self.vae = engine.transformer, engine.vae
        else:
            from diffusers import AutoencoderKL

            torch.manual_seed(0)
            with torch.device(self.device):
                transformer = PixCellTransformer2DModel(**PIXCELL_1024_CONFIG)
                vae = AutoencoderKL(**SD35_VAE_CONFIG)
            # nn.Module.to: diffusers' ModelMixin.to warns about float32 modules it has none of
            self.transformer = torch.nn.Module.to(transformer, self.device, self.dtype)
            self.vae = torch.nn.Module.to(vae, self.device, self.dtype)
            self.transformer.eval().requires_grad_(False)
            self.vae.eval().requires_grad_(False)
        self.config = {k: v for k, v in self.transformer.config.items() if not k.startswith("_")}
        params = sum(p.numel() for p in self.transformer.parameters())
        vae_params = sum(p.numel() for p in self.vae.parameters())
        print(
            f"models: transformer {params / 1e6:.1f} M parameters "
            f"({self.config['num_layers']} blocks, hidden "
            f"{self.config['num_attention_heads'] * self.config['attention_head_dim']}), "
            f"VAE {vae_params / 1e6:.1f} M, {str(self.dtype).removeprefix('torch.')}, "
            f"built in {time.perf_counter() - start:.1f} s"
        )

    def flops(self, height: int, width: int, kv: int) -> float:
        """Analytic FLOPs of one forward of one image of this bench's transformer."""
        return transformer_flops(self.config, height, width, kv_ratio=kv)

    def mfu(self, flop: float, ms: float) -> float | None:
        if self.peak_tflops is None or ms <= 0:
            return None
        return flop / (ms / 1e3) / (self.peak_tflops * 1e12)

    def inputs(
        self, batch: int, resolution: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        gen = torch.Generator(device=self.device).manual_seed(0)
        side = resolution // 8
        latents = torch.randn(
            batch, cfg["in_channels"], side, side, generator=gen, device=self.device
        ).to(self.dtype)
        rows = torch.randn(
            batch, cfg["caption_num_tokens"], cfg["caption_channels"], generator=gen,
            device=self.device,
        ).to(self.dtype)
        t = torch.full((batch,), 500, device=self.device, dtype=torch.long)
        return latents, rows, t

    # -- rows

    def forward_row(
        self,
        batch: int,
        resolution: int,
        kv: int,
        *,
        attention: str = "sdpa",
        compiled: bool = False,
        model: Any = None,
        warmup: int | None = None,
    ) -> dict[str, Any]:
        """Time the transformer forward; append and return the row."""
        row: dict[str, Any] = {
            "kind": "forward", "batch": batch, "resolution": resolution, "kv": kv,
            "attention": attention, "compiled": compiled,
        }
        model = self.transformer if model is None else model
        try:
            latents, rows, t = self.inputs(batch, resolution)
            with torch.inference_mode():
                if compiled:  # the first call compiles; its time is reported apart
                    begin = time.perf_counter()
                    _forward(model, latents, rows, t)
                    _sync(self.device)
                    row["compile_s"] = time.perf_counter() - begin
                times, peak = time_ms(
                    lambda: _forward(model, latents, rows, t), self.device,
                    warmup=self.warmup if warmup is None else warmup, iters=self.iters,
                )
            ms = statistics.median(times)
            flop = batch * self.flops(resolution, resolution, kv)
            row.update(status="ok", ms=ms, ms_all=times, tflop=flop / 1e12,
                       mfu=self.mfu(flop, ms), peak_gb=peak)
        except Exception as err:  # OOM or a backend failure: report it, go on
            if compiled and not _is_oom(err):
                raise
            row.update(status="OOM" if _is_oom(err) else f"error: {_short(err)}")
        finally:
            _release(self.device)
        self.rows.append(row)
        return row

    def e2e_row(self, batch: int, kv: int, *, compiled: bool = False) -> dict[str, Any]:
        """Images/s of the variation pipeline (steps, CFG, VAE decode) at the tile size."""
        steps, guidance = self.args.steps, self.args.guidance
        row: dict[str, Any] = {
            "kind": "e2e", "batch": batch, "resolution": self.tile, "kv": kv,
            "attention": "sdpa", "compiled": compiled, "steps": steps, "guidance": guidance,
        }
        pipe = VariationPipeline(
            transformer=self.transformer, vae=self.vae, scheduler=make_scheduler("dpm-solver++")
        )
        pipe.set_progress_bar_config(disable=True)
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(1)
        uni = torch.randn(batch, cfg["caption_num_tokens"], cfg["caption_channels"], generator=gen)

        def call() -> Any:
            return pipe(uni_rows=uni, guidance_scale=guidance, num_inference_steps=steps,
                        seeds=list(range(batch)), output_type="numpy").images

        try:
            times, peak = time_ms(call, self.device, warmup=self.e2e_warmup,
                                  iters=self.e2e_iters)
            ms = statistics.median(times)
            cfg_batch = 2 * batch if guidance != 1 else batch
            flop = steps * cfg_batch * self.flops(self.tile, self.tile, kv)
            row.update(status="ok", ms=ms, ms_all=times, images_per_s=batch / (ms / 1e3),
                       tflop=flop / 1e12, mfu=self.mfu(flop, ms), peak_gb=peak)
        except Exception as err:
            if compiled and not _is_oom(err):
                raise
            row.update(status="OOM" if _is_oom(err) else f"error: {_short(err)}")
        finally:
            _release(self.device)
        self.rows.append(row)
        return row

    def vae_row(self, batch: int) -> dict[str, Any]:
        """Time the VAE decode alone (LatentCodec.decode to a float tensor)."""
        row: dict[str, Any] = {"kind": "vae_decode", "batch": batch, "resolution": self.tile}
        codec = LatentCodec(self.vae)
        side = self.tile // codec.downsample
        gen = torch.Generator(device=self.device).manual_seed(2)
        latents = torch.randn(batch, codec.latent_channels, side, side, generator=gen,
                              device=self.device)
        try:
            times, peak = time_ms(lambda: codec.decode(latents, output="tensor"), self.device,
                                  warmup=1, iters=max(1, self.iters // 2))
            row.update(status="ok", ms=statistics.median(times), ms_all=times, peak_gb=peak)
        except Exception as err:
            row.update(status="OOM" if _is_oom(err) else f"error: {_short(err)}")
        finally:
            _release(self.device)
        self.rows.append(row)
        return row

    def uni_row(self, batch: int, encoder: Any) -> dict[str, Any]:
        """Time the conditioning encoder on ``batch`` tiles (16 crops each at 1024²)."""
        row: dict[str, Any] = {"kind": "uni2h", "batch": batch, "resolution": self.tile}
        gen = torch.Generator(device=self.device).manual_seed(3)
        tiles = torch.rand(batch, 3, self.tile, self.tile, generator=gen, device=self.device)
        try:
            times, peak = time_ms(lambda: encoder.encode(tiles), self.device, warmup=1,
                                  iters=max(1, self.iters // 2))
            row.update(status="ok", ms=statistics.median(times), ms_all=times, peak_gb=peak)
        except Exception as err:
            row.update(status="OOM" if _is_oom(err) else f"error: {_short(err)}")
        finally:
            _release(self.device)
        self.rows.append(row)
        return row

    def find(self, **keys: Any) -> dict[str, Any] | None:
        """The first measured (status ok) row with these key values."""
        for row in self.rows:
            if row.get("status") == "ok" and all(row.get(k) == v for k, v in keys.items()):
                return row
        return None


# --------------------------------------------------------------------------- sections


def section_flops(tiny_config: dict[str, Any] | None) -> dict[str, Any]:
    """Analytic FLOPs of the real PixCell-1024 (1024², 2048², 4096²; KV off / R = 2),
    checked against FlopCounterMode on the meta device and against engine-facts.md."""
    out: dict[str, Any] = {"convention": "2 FLOPs per multiply-accumulate; matmuls and convs"}
    cfg = PIXCELL_1024_CONFIG
    print("\nAnalytic FLOPs, PixCell-1024 (28 blocks, hidden 1152), one forward of one image"
          " (2 FLOPs per MAC; matmuls/convs only)")
    print(f"  {'image':>7} {'tokens':>7} {'KV off TFLOP':>13} {'KV R=2 TFLOP':>13} {'saving':>7}")
    table = {}
    for side in (1024, 2048, 4096):
        off = transformer_flops(cfg, side, side)
        kv2 = transformer_flops(cfg, side, side, kv_ratio=2)
        tokens = (side // 16) ** 2
        table[side] = {"kv_off": off, "kv_r2": kv2, "saving": 1 - kv2 / off, "tokens": tokens}
        print(f"  {side:>6}² {tokens:>7} {off / 1e12:>13.3f} {kv2 / 1e12:>13.3f} "
              f"{1 - kv2 / off:>7.1%}")
    out["pixcell_1024"] = {str(k): v for k, v in table.items()}
    terms = transformer_flop_terms(cfg, 1024, 1024)
    total = sum(terms.values())
    print("  at 1024², by part: " + ", ".join(
        f"{k} {v / total:.1%}" for k, v in terms.items() if v / total >= 0.001))
    out["terms_1024"] = terms

    checks = {}
    for kv in (1, 2):
        measured = measured_transformer_flops(cfg, 1024, 1024, kv_ratio=kv)
        analytic = table[1024]["kv_off" if kv == 1 else "kv_r2"]
        checks[f"kv{kv}"] = {"analytic": analytic, "flop_counter": measured}
        label = "off" if kv == 1 else "R=2"
        print(f"  check, KV {label} at 1024²: torch FlopCounterMode (meta device) "
              f"{measured / 1e12:.4f} TFLOP; analytic / counted = {analytic / measured:.5f}")
    out["flop_counter_check"] = checks
    t1024, s1024, s4096 = table[1024]["kv_off"] / 1e12, table[1024]["saving"], table[4096]["saving"]
    ok_total = abs(t1024 - DOC_TFLOP_1024) / DOC_TFLOP_1024 < 0.02
    ok_saving = abs(s1024 - DOC_KV_SAVING_1024) < 0.01 and abs(s4096 - DOC_KV_SAVING_4096) < 0.01
    print(f"  engine-facts.md says ≈{DOC_TFLOP_1024} TFLOP at 1024² and ≈13 % / ≈33 % saved by "
          f"R=2 at 1024² / 4096²: {t1024:.2f} TFLOP, {s1024:.1%} / {s4096:.1%} -> "
          f"{'consistent' if ok_total and ok_saving else 'DIFFERS'}")
    out["doc_consistent"] = bool(ok_total and ok_saving)
    if tiny_config is not None:
        analytic = transformer_flops(tiny_config, 256, 256)
        measured = measured_transformer_flops(tiny_config, 256, 256)
        print(f"  tiny preset at 256²: analytic {analytic / 1e9:.4f} GFLOP, FlopCounterMode "
              f"{measured / 1e9:.4f} GFLOP")
        out["tiny_256"] = {"analytic": analytic, "flop_counter": measured}
    return out


def section_forward(bench: Bench) -> None:
    for kv in bench.kvs:
        configure(bench.transformer, kv, "sdpa")
        for resolution in bench.resolutions:
            for batch in bench.batches:
                bench.forward_row(batch, resolution, kv)
    configure(bench.transformer, 1, "sdpa")


def section_e2e(bench: Bench) -> None:
    kvs = (1,) if bench.args.quick and not bench.tiny else bench.kvs
    for kv in kvs:
        configure(bench.transformer, kv, "sdpa")
        for batch in bench.batches:
            bench.e2e_row(batch, kv)
    configure(bench.transformer, 1, "sdpa")
    for batch in bench.batches:
        bench.vae_row(batch)


def section_attention(bench: Bench) -> None:
    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        print("attention: xformers not installed (SDPA only)")
        bench.notes.append("xformers not installed")
        return
    if bench.device.type != "cuda":
        print("attention: xformers needs CUDA; skipped on the CPU")
        bench.notes.append("xformers skipped: no CUDA")
        return
    resolutions = bench.resolutions[:1] if bench.args.quick else bench.resolutions
    batches = bench.batches[-1:] if bench.args.quick else bench.batches
    try:
        for resolution in resolutions:
            for batch in batches:
                configure(bench.transformer, 1, "xformers")
                bench.forward_row(batch, resolution, 1, attention="xformers")
    finally:
        configure(bench.transformer, 1, "sdpa")


def section_compile(bench: Bench) -> None:
    """``torch.compile`` of the transformer in place (as ``load_engine(compile=True)``)."""
    resolution = bench.resolutions[0]
    if bench.device.type == "cpu" and not bench.args.cpu_compile:
        message = ("compile: skipped on the CPU (inductor's C++ build alone takes minutes "
                   "here); pass --cpu-compile to run it")
        print(message)
        bench.notes.append(message)
        bench.rows.append({"kind": "forward", "batch": bench.batches[-1],
                           "resolution": resolution, "kv": 1, "attention": "sdpa",
                           "compiled": True, "status": "skipped (CPU)"})
        return
    if bench.args.quick:
        plan: list[tuple[int, tuple[int, ...], bool]] = [(1, bench.batches[-1:], False)]
    else:  # KV off at both batches; KV R=2 at the larger batch, plus its pipeline
        plan = [(1, bench.batches, False), (2, bench.batches[-1:], True)]
    model = bench.transformer
    try:
        import torch._dynamo

        model.compile(dynamic=False, mode=bench.args.compile_mode)
        for kv, batches, with_e2e in plan:
            configure(model, kv, "sdpa")
            torch._dynamo.reset()  # processors changed: start from fresh graphs
            for batch in batches:
                bench.forward_row(batch, resolution, kv, compiled=True, warmup=bench.warmup)
            if with_e2e:
                bench.e2e_row(bench.batches[-1], kv, compiled=True)
    except Exception as err:  # a compiler failure is a result, not a crash
        message = f"torch.compile failed: {_short(err)}"
        print(message)
        bench.notes.append(message)
        bench.rows.append({"kind": "forward", "compiled": True, "status": f"error: {_short(err)}"})
    finally:
        model._compiled_call_impl = None  # back to eager (nn.Module.compile sets only this)
        torch._dynamo.reset()
        configure(model, 1, "sdpa")


def section_uni(bench: Bench) -> None:
    if bench.tiny:
        print("uni: the tiny preset's encoder is a stand-in; UNI2-h is timed on CUDA only")
        return
    from histosynth.synthesis.models.encoders import UNIEncoder, create_uni2h

    try:
        encoder = UNIEncoder(create_uni2h(device=bench.device)).to(bench.device, bench.dtype)
    except Exception as err:
        print(f"uni: cannot build UNI2-h ({_short(err)})")
        bench.notes.append(f"UNI2-h not built: {_short(err)}")
        return
    for batch in bench.batches:
        bench.uni_row(batch, encoder)
    del encoder
    _release(bench.device)


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(bench: Bench) -> None:
    print("\nResults" + (" (tiny preset, CPU: not comparable to the GPU benchmark)"
                         if bench.tiny and bench.device.type == "cpu" else ""))
    head = (f"  {'what':<11} {'batch':>5} {'res':>5} {'KV':>4} {'attn':>8} {'compile':>7} "
            f"{'time':>11} {'img/s':>8} {'MFU':>6} {'peak GB':>8}")
    print(head)
    for row in bench.rows:
        status = row.get("status", "")
        kv = row.get("kv")
        kv_text = "-" if kv is None else ("off" if kv == 1 else f"R={kv}")
        if status == "ok":
            ms = row["ms"]
            time_text = f"{ms / 1e3:.3f} s" if ms >= 10_000 else f"{ms:.2f} ms"
        else:
            time_text = status[:40]
        compiled = row.get("compiled")
        print(
            f"  {row['kind']:<11} {row.get('batch', '-')!s:>5} {row.get('resolution', '-')!s:>5} "
            f"{kv_text:>4} {row.get('attention', '-')!s:>8} "
            f"{'-' if compiled is None else ('on' if compiled else 'off'):>7} {time_text:>11} "
            f"{_fmt(row.get('images_per_s'), '.3f', '-'):>8} {_fmt(row.get('mfu'), '.1%'):>6} "
            f"{_fmt(row.get('peak_gb'), '.2f'):>8}"
            + (f"  (compile {row['compile_s']:.0f} s)" if "compile_s" in row else "")
        )
    if any(row["kind"] == "e2e" for row in bench.rows):
        print("  (e2e time covers the whole pipeline call; its MFU counts the transformer's "
              "FLOPs only: steps × 2B forwards)")


def compute_ratios(bench: Bench) -> list[tuple[str, float]]:
    """Ratios of numbers measured in this run (e.g. KV R=2 / off forward time)."""
    out: list[tuple[str, float]] = []
    base = {"kind": "forward", "attention": "sdpa", "compiled": False}
    for resolution in bench.resolutions:
        for batch in bench.batches:
            off = bench.find(**base, batch=batch, resolution=resolution, kv=1)
            kv2 = bench.find(**base, batch=batch, resolution=resolution, kv=2)
            if off and kv2:
                out.append((f"KV R=2 / off forward time at {resolution}², batch {batch}",
                            kv2["ms"] / off["ms"]))
        flop_ratio = bench.flops(resolution, resolution, 2) / bench.flops(resolution, resolution, 1)
        out.append((f"KV R=2 / off analytic FLOPs at {resolution}²", flop_ratio))
    lo, hi = bench.batches[0], bench.batches[-1]
    for resolution in bench.resolutions:
        for kv in bench.kvs:
            a = bench.find(**base, batch=lo, resolution=resolution, kv=kv)
            b = bench.find(**base, batch=hi, resolution=resolution, kv=kv)
            if a and b:
                label = "off" if kv == 1 else f"R={kv}"
                out.append((f"time per image, batch {hi} / batch {lo} at {resolution}², KV {label}",
                            (b["ms"] / hi) / (a["ms"] / lo)))
    r0, r1 = bench.resolutions[0], bench.resolutions[-1]
    if r1 != r0:
        a = bench.find(**base, batch=lo, resolution=r0, kv=1)
        b = bench.find(**base, batch=lo, resolution=r1, kv=1)
        if a and b:
            out.append((f"forward time {r1}² / {r0}², batch {lo}, KV off", b["ms"] / a["ms"]))
            out.append((f"analytic FLOPs {r1}² / {r0}²",
                        bench.flops(r1, r1, 1) / bench.flops(r0, r0, 1)))
    for row in bench.rows:
        if row["kind"] != "forward" or row.get("status") != "ok":
            continue
        keys = {k: row[k] for k in ("batch", "resolution", "kv")}
        if row["attention"] == "xformers" and not row["compiled"]:
            ref = bench.find(**base, **keys)
            if ref:
                out.append((f"xformers / SDPA forward time at {keys['resolution']}², batch "
                            f"{keys['batch']}", row["ms"] / ref["ms"]))
        if row["compiled"] and row["attention"] == "sdpa":
            ref = bench.find(**base, **keys)
            if ref:
                kv_text = "off" if keys["kv"] == 1 else f"R={keys['kv']}"
                out.append((f"compile on / off forward time at {keys['resolution']}², batch "
                            f"{keys['batch']}, KV {kv_text}", row["ms"] / ref["ms"]))
    e2e = {"kind": "e2e", "compiled": False}
    a, b = bench.find(**e2e, batch=lo, kv=1), bench.find(**e2e, batch=hi, kv=1)
    if a and b:
        out.append((f"images/s end to end, batch {hi} / batch {lo}",
                    b["images_per_s"] / a["images_per_s"]))
    for batch in bench.batches:
        off, kv2 = bench.find(**e2e, batch=batch, kv=1), bench.find(**e2e, batch=batch, kv=2)
        if off and kv2:
            out.append((f"images/s end to end, KV R=2 / off, batch {batch}",
                        kv2["images_per_s"] / off["images_per_s"]))
        best = bench.find(kind="e2e", compiled=True, batch=batch)
        if off and best:
            out.append((f"images/s end to end, compile + KV R={best['kv']} / baseline, "
                        f"batch {batch}", best["images_per_s"] / off["images_per_s"]))
        dec = bench.find(kind="vae_decode", batch=batch)
        if off and dec:
            out.append((f"VAE decode share of end-to-end time, batch {batch}",
                        dec["ms"] / off["ms"]))
    return out


def _describe_device(bench: Bench) -> str:
    if bench.device.type == "cuda":
        index = bench.device.index if bench.device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        return (f"{torch.cuda.get_device_name(index)} ({props.total_memory / 2**30:.0f} GiB), "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def _parse_sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        raise SystemExit(f"--sections: unknown {bad}; expected some of {', '.join(SECTIONS)}")
    return chosen


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and ratios; return (and optionally write) all
    numbers as a JSON-ready dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer iterations and combinations")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny preset even on CUDA (a smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak dense TFLOP/s for MFU (CUDA default "
                             f"{H100_BF16_DENSE_TFLOPS:g}: H100/H200 bf16)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps end to end")
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale end to end")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile section")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="run the compile section on the CPU too (slow)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, reduce-overhead, max-autotune)")
    parser.add_argument("--out", type=Path, default=None, help="write all numbers as JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    sections = _parse_sections(args.sections)
    if args.no_compile and "compile" in sections:
        sections.remove("compile")

    started = time.perf_counter()
    bench = Bench(args)
    if bench.tiny:
        if bench.device.type == "cpu" and not torch.cuda.is_available():
            print("no CUDA device: running the tiny preset on the CPU; numbers are not "
                  "comparable to the GPU benchmark")
        else:
            print(f"device {bench.device}: running the tiny preset; numbers are not "
                  "comparable to the GPU benchmark")
    print(f"device: {_describe_device(bench)}")
    if bench.peak_tflops is not None:
        print(f"MFU against a peak of {bench.peak_tflops:g} TFLOP/s"
              + (" (H100/H200 dense bf16; pass --peak-tflops for another GPU)"
                 if args.peak_tflops is None else ""))
    else:
        print("MFU: n/a (no peak given for this device; pass --peak-tflops)")

    result: dict[str, Any] = {
        "device": _describe_device(bench),
        "preset": "tiny (UNTRAINED, not comparable)" if bench.tiny else
                  "pixcell-1024 architecture, random weights",
        "dtype": str(bench.dtype).removeprefix("torch."),
        "peak_tflops": bench.peak_tflops,
        "sections": sections,
    }
    bench.build()
    result["transformer_config"] = bench.config
    timings: dict[str, float] = {}
    for name in sections:
        begin = time.perf_counter()
        if name == "flops":
            result["flops"] = section_flops(bench.config if bench.tiny else None)
        else:
            print(f"\n[{name}] ...", flush=True)
            {"forward": section_forward, "e2e": section_e2e, "attention": section_attention,
             "compile": section_compile, "uni": section_uni}[name](bench)
        timings[name] = time.perf_counter() - begin
    print_table(bench)
    ratios = compute_ratios(bench)
    if ratios:
        print("\nRatios (measured in this run)")
        width = max(len(label) for label, _ in ratios)
        for label, value in ratios:
            print(f"  {label:<{width}}  {value:.3f}")
    for note in bench.notes:
        print(f"note: {note}")
    total = time.perf_counter() - started
    print("\nsection times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; total {total:.0f} s")
    result.update(rows=bench.rows, ratios=dict(ratios), notes=bench.notes,
                  section_seconds=timings, total_seconds=total)
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
