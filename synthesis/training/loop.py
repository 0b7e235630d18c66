"""The training loop shared by LoRA adapters and full fine-tuning.

ε-prediction on the DDPM schedule the engine was trained with: for each sample a posterior
draw ``z₀``, noise ``ε``, a timestep ``t`` and — with probability ``uncond_prob`` — the
learned null condition instead of its UNI rows; the loss is the MSE between ε and the
first ``C`` of the model's ``2C`` output channels (PixArt's learned-σ split), weighted by
Min-SNR-γ (``min(SNR, γ) / SNR``, diffusers' ``compute_snr``). AdamW, diffusers'
``get_scheduler``, gradient clipping, optional EMA; ``accelerate`` runs mixed precision,
gradient accumulation and multi-process data parallelism (``accelerate launch``).

Every random number comes from :mod:`histosynth.synthesis.training.data`, so a run
resumed from a checkpoint ends with the same weights as an uninterrupted run (bit for
bit on the CPU), and the loss of a step does not depend on how many processes share it.

Validation: the held-out samples, each at one timestep drawn inside each of 4 equal bins
of the training timestep range, with noise fixed by the seed; plain (unweighted) MSE,
always conditional. ``val_loss`` is the mean, ``val_loss_t<lo>-<hi>`` the bins.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.training.checkpoints import (
    find_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)
from histosynth.synthesis.training.config import TrainConfig
from histosynth.synthesis.training.data import (
    EncodedSamples,
    collate,
    sample_generator,
    step_indices,
)

__all__ = [
    "VALIDATION_BINS",
    "TrainResult",
    "apply_model_options",
    "diffusion_loss",
    "make_accelerator",
    "run_training",
    "trainable_parameters",
    "validation_losses",
]

VALIDATION_BINS = 4
"""Timestep bins of the validation loss."""

LOG_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """What a finished run measured.

    ``metrics``: final validation losses (``val_loss``, per bin) and
    ``val_loss_initial`` (before the first step of the run, when not resumed);
    ``history``: one record per logged step (``step``, ``loss``, ``lr``, validation
    losses where measured); ``images_per_second``: training samples per second over the
    steps run in this process (all processes together).
    """

    steps: int
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    peak_memory_bytes: int | None = None
    resumed_from: int | None = None
    work_dir: Path | None = None
    main_process: bool = True


# --------------------------------------------------------------------------- accelerate


def make_accelerator(config: TrainConfig, device: torch.device | None = None):
    """An ``accelerate.Accelerator`` for ``config`` (fresh state per run in one process).

    ``device`` ``cpu`` forces the CPU. Raises :class:`EngineError` for fp16 without CUDA
    (use bf16 on the CPU).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    cpu = device is not None and torch.device(device).type == "cpu"
    if config.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise EngineError(
            "fp16 mixed precision needs a CUDA GPU; use --mixed-precision bf16 on the CPU",
            item="mixed_precision",
        )
    AcceleratorState._reset_state()  # keeps the process group of `accelerate launch`
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu,
        step_scheduler_with_optimizer=False,
    )


def apply_model_options(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Set ``config``'s KV-compression (``None`` keeps the model's, 1 turns it off, R ≥ 2
    compresses with fresh average-pooling convs unless the model already has R) and
    attention implementation on ``model``; returns it."""
    from histosynth.synthesis.engine import set_attention
    from histosynth.synthesis.models.kv_compression import (
        disable_kv_compression,
        enable_kv_compression,
    )

    ratio = config.kv_compress
    if ratio == 1:
        disable_kv_compression(model)
    elif ratio is not None and ratio != model.config.get("kv_compress_ratio"):
        enable_kv_compression(model, ratio=int(ratio))
    set_attention(model, config.attention)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad``, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- losses


def _draw(
    dataset: EncodedSamples,
    index: int,
    generator: torch.Generator,
    *,
    timestep_range: tuple[int, int],
    uncond_prob: float,
) -> dict[str, Any]:
    """One sample and its noise, timestep and dropout, all from ``generator``."""
    item = dataset.sample(index, generator)
    latents = item["latents"].float()
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(timestep_range[0], timestep_range[1], (1,), generator=generator)
    drop = torch.rand((1,), generator=generator) < uncond_prob
    return {
        "latents": latents,
        "rows": item["rows"].float(),
        "noise": noise,
        "timestep": t[0],
        "drop": drop[0],
    }


def diffusion_loss(
    model: nn.Module,
    batch: dict[str, Any],
    noise_scheduler: Any,
    *,
    snr_gamma: float | None,
    null_rows: torch.Tensor,
) -> torch.Tensor:
    """Per-sample losses [B] of a collated batch (``latents, rows, noise, timestep, drop``).

    ``null_rows`` [tokens, dim] replaces the rows of dropped samples.
    """
    param = next(p for p in model.parameters())
    device = param.device
    latents = batch["latents"].to(device)
    noise = batch["noise"].to(device)
    timesteps = batch["timestep"].to(device)
    rows = batch["rows"].to(device)
    drop = batch["drop"].to(device)
    rows = torch.where(drop[:, None, None], null_rows.to(device, rows.dtype)[None], rows)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    out = model(
        noisy,
        encoder_hidden_states=rows,
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    eps = out[:, : latents.shape[1]].float()  # learned σ: [ε | variance]
    losses = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).float()
        losses = losses * torch.clamp(snr, max=snr_gamma) / snr
    return losses


def _bins(timestep_range: tuple[int, int]) -> list[tuple[int, int]]:
    low, high = timestep_range
    edges = [low + round((high - low) * k / VALIDATION_BINS) for k in range(VALIDATION_BINS + 1)]
    return [(a, max(b, a + 1)) for a, b in itertools.pairwise(edges)]


@torch.no_grad()
def validation_losses(
    model: nn.Module,
    dataset: EncodedSamples,
    indices: Sequence[int],
    noise_scheduler: Any,
    *,
    seed: int,
    batch_size: int,
    timestep_range: tuple[int, int] = (0, 1000),
) -> dict[str, float]:
    """Held-out ε-MSE: mean (``val_loss``) and per timestep bin (``val_loss_t<lo>-<hi>``).

    Deterministic for a seed: the same weights give the same numbers.
    """
    if not indices:
        return {}
    draws, bins = [], _bins(timestep_range)
    for index in indices:
        for b, (low, high) in enumerate(bins):
            g = sample_generator(seed, "validation", index, b)
            draw = _draw(dataset, index, g, timestep_range=(low, high), uncond_prob=0.0)
            draws.append((b, draw))
    was_training = model.training
    model.eval()
    per_bin: list[list[float]] = [[] for _ in bins]
    try:
        for start in range(0, len(draws), batch_size):
            chunk = draws[start : start + batch_size]
            batch = collate([d for _, d in chunk])
            losses = diffusion_loss(
                model,
                batch,
                noise_scheduler,
                snr_gamma=None,
                null_rows=torch.zeros(batch["rows"].shape[1:]),
            )
            for (b, _), value in zip(chunk, losses.tolist(), strict=True):
                per_bin[b].append(value)
    finally:
        model.train(was_training)
    out = {"val_loss": float(sum(map(sum, per_bin)) / len(draws))}
    for (low, high), values in zip(bins, per_bin, strict=True):
        out[f"val_loss_t{low}-{high}"] = float(sum(values) / len(values))
    return out


# --------------------------------------------------------------------------- the loop


def _check_resume(checkpoint, fingerprint: dict[str, Any]) -> None:
    saved = checkpoint.state.get("fingerprint", {})
    if saved == fingerprint:
        return
    keys = sorted(set(saved) | set(fingerprint))
    diffs = [
        f"{k}: {saved.get(k)!r} ≠ {fingerprint.get(k)!r}"
        for k in keys
        if saved.get(k) != fingerprint.get(k)
    ]
    raise EngineError(
        "this checkpoint was made with another configuration ("
        + "; ".join(diffs[:4])
        + (" …" if len(diffs) > 4 else "")
        + "); start a new work folder or use the settings it was made with",
        path=checkpoint.folder,
    )


def _write_log(work_dir: Path, history: list[dict[str, Any]]) -> None:
    tmp = work_dir / f".{LOG_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), "utf-8")
    tmp.replace(work_dir / LOG_FILE)


def run_training(
    model: nn.Module,
    train_data: EncodedSamples,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    config: TrainConfig,
    noise_scheduler: Any,
    work_dir: Path,
    fingerprint: dict[str, Any],
    resume: bool = False,
    device: torch.device | None = None,
    on_checkpoint: Callable[[nn.Module, int], None] | None = None,
    progress: Callable[..., Any] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require gradients; return what was measured.

    Args:
        model: a PixCell transformer whose trainable parameters are set (LoRA or all);
            trained in place. With ``config.ema`` it ends holding the EMA weights.
        train_data: samples; ``train_indices`` / ``val_indices`` split them.
        noise_scheduler: the DDPM schedule (``add_noise``, ``alphas_cumprod``).
        work_dir: checkpoints (``checkpoints/``) and ``metrics.jsonl`` go here.
        fingerprint: what a checkpoint must match to be resumed (with
            ``config.fingerprint()`` added here).
        resume: continue from the latest checkpoint in ``work_dir``; without it, a
            ``work_dir`` that holds checkpoints is refused.
        on_checkpoint: called on the main process after each checkpoint with the
            (unwrapped) model and the step, e.g. to write a grid of samples.
        progress: ``progress(total=…, initial=…)`` returning a tqdm-like bar.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    work_dir = Path(work_dir)
    if not train_indices:
        raise EngineError("no training samples (the dataset is empty)", item="dataset")
    fingerprint = {**fingerprint, "config": config.fingerprint()}
    checkpoints_dir = work_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints_dir)
    if latest is not None and not resume:
        raise EngineError(
            f"holds checkpoints of an earlier run (last: step {latest.step}); pass --resume "
            "to continue it or choose another work folder",
            path=work_dir,
        )
    if latest is not None:
        _check_resume(latest, fingerprint)

    accelerator = make_accelerator(config, device)
    processes, rank = accelerator.num_processes, accelerator.process_index
    total = config.total_steps(len(train_indices), processes)
    model.to(accelerator.device)
    cast_training_params(model, dtype=torch.float32)
    params = trainable_parameters(model)
    if not params:
        raise EngineError("the model has no trainable parameters", item="model")
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        list(params.values()),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total,
    )
    ema = EMAModel(list(params.values()), decay=config.ema_decay) if config.ema else None
    start, history, resumed_from = 0, [], None
    if latest is not None:
        weights = latest.weights()
        missing = sorted(set(params) - set(weights))
        if missing:
            raise EngineError(
                f"checkpoint lacks trainable weights {missing[:3]}", path=latest.folder
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        optimizer.load_state_dict(latest.torch_state("optimizer"))
        lr_scheduler.load_state_dict(latest.torch_state("lr_scheduler"))
        if ema is not None:
            ema.load_state_dict(latest.torch_state("ema"))
        start, history, resumed_from = latest.step, list(latest.state["history"]), latest.step
    if config.compile:
        model.compile()
    prepared, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(prepared)
    null_rows = unwrapped.caption_projection.uncond_embedding.detach().float().cpu()
    if start >= total:
        raise EngineError(
            f"the run is already complete ({start} of {total} steps); raise --steps to "
            "train further",
            path=checkpoints_dir,
        )

    def ema_weights():
        if ema is None:
            return None
        ema.store(list(params.values()))
        ema.copy_to(list(params.values()))
        return True

    def validate() -> dict[str, float]:
        swapped = ema_weights()
        try:
            with accelerator.autocast():
                return validation_losses(
                    unwrapped,
                    train_data,
                    val_indices,
                    noise_scheduler,
                    seed=config.seed,
                    batch_size=config.batch_size,
                    timestep_range=config.timestep_range,
                )
        finally:
            if swapped:
                ema.restore(list(params.values()))

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        if accelerator.is_main_process:
            state = {
                "fingerprint": fingerprint,
                "history": history,
                "val_loss": metrics.get("val_loss"),
                "total_steps": total,
            }
            write_checkpoint(
                checkpoints_dir,
                step,
                weights={n: p.detach() for n, p in params.items()},
                states={
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "ema": None if ema is None else ema.state_dict(),
                },
                state=state,
            )
            prune_checkpoints(checkpoints_dir, config.keep_best)
            _write_log(work_dir, history)
            if on_checkpoint is not None and (config.sample_every is None):
                swapped = ema_weights()
                try:
                    on_checkpoint(unwrapped, step)
                finally:
                    if swapped:
                        ema.restore(list(params.values()))
        accelerator.wait_for_everyone()

    work_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    if start == 0 and accelerator.is_main_process:
        initial = validate()
        metrics = {f"{k}_initial": v for k, v in initial.items() if k == "val_loss"}
        history.append({"step": 0, **initial})
    bar = progress(total=total, initial=start) if progress is not None else None
    prepared.train()
    began, samples = time.perf_counter(), 0
    validate_every = config.validate_every or config.checkpoint_every
    for step in range(start, total):
        running = torch.zeros((), dtype=torch.float64)
        for micro in range(config.grad_accum):
            picks = step_indices(
                train_indices,
                seed=config.seed,
                step=step,
                micro=micro,
                batch_size=config.batch_size,
                grad_accum=config.grad_accum,
                processes=processes,
                rank=rank,
            )
            draws = [
                _draw(
                    train_data,
                    index,
                    sample_generator(config.seed, "train", epoch, pos),
                    timestep_range=config.timestep_range,
                    uncond_prob=config.uncond_prob,
                )
                for index, epoch, pos in picks
            ]
            batch = collate(draws)
            with accelerator.accumulate(prepared):
                losses = diffusion_loss(
                    prepared,
                    batch,
                    noise_scheduler,
                    snr_gamma=config.snr_gamma,
                    null_rows=null_rows,
                )
                loss = losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach().double().cpu() / config.grad_accum
        lr_scheduler.step()
        if ema is not None:
            ema.step(list(params.values()))
        samples += config.batch_size * config.grad_accum * processes
        mean_loss = float(accelerator.reduce(running.to(accelerator.device), "mean"))
        if not math.isfinite(mean_loss):
            raise EngineError(
                f"the training loss became {mean_loss} at step {step + 1}; "
                "lower --lr or use another --mixed-precision",
                item="loss",
            )
        record = {"step": step + 1, "loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}
        done = step + 1
        if (done % validate_every == 0 or done == total) and accelerator.is_main_process:
            metrics = validate()
            record.update(metrics)
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            bar.update(1)
        if done % config.checkpoint_every == 0 or done == total:
            checkpoint(done, metrics)
        if (
            config.sample_every
            and on_checkpoint is not None
            and accelerator.is_main_process
            and done % config.sample_every == 0
        ):
            on_checkpoint(unwrapped, done)
    seconds = time.perf_counter() - began
    if bar is not None:
        bar.close()
    if ema is not None:
        ema.copy_to(list(params.values()))
    final = dict(metrics)
    for record in history:  # the initial loss of a resumed run is in its history
        if record["step"] == 0 and "val_loss" in record:
            final.setdefault("val_loss_initial", record["val_loss"])
    peak = torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda" else None
    accelerator.wait_for_everyone()
    result = TrainResult(
        steps=total,
        metrics=final,
        history=history,
        seconds=seconds,
        images_per_second=samples / seconds if seconds > 0 else 0.0,
        peak_memory_bytes=peak,
        resumed_from=resumed_from,
        work_dir=work_dir,
        main_process=accelerator.is_main_process,
    )
    return result


def kept_checkpoints(work_dir: Path) -> list[int]:
    """Steps of the checkpoints in ``work_dir`` (for reports and tests)."""
    return [c.step for c in find_checkpoints(Path(work_dir) / "checkpoints")]
