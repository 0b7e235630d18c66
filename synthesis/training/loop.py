"""The training loop shared by LoRA adapters and full fine-tuning.

ε-prediction on the DDPM schedule the engine was trained with, the losses of
:mod:`histosynth.synthesis.training.losses`. AdamW, diffusers' ``get_scheduler``,
gradient clipping, optional EMA; ``accelerate`` runs mixed precision, gradient
accumulation and multi-process data parallelism (``accelerate launch``).

Every random number comes from :mod:`histosynth.synthesis.training.data`, so a run
resumed from a checkpoint ends with the same weights as an uninterrupted run (bit for
bit on the CPU), and the loss of a step does not depend on how many processes share it.

:func:`run_training` sets a run up (:func:`_set_up`: optimizer, schedule, EMA, the
restored checkpoint), runs its steps (:func:`_train_step`), writes checkpoints
(:func:`_write_checkpoint`) and reports what it measured (:func:`_finish`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.training.checkpoints import (
    Checkpoint,
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
from histosynth.synthesis.training.losses import (
    VALIDATION_BINS,
    diffusion_loss,
    validation_losses,
)

# scripts/bench_train.py and tests/unit/test_training.py draw samples as the loop does
from histosynth.synthesis.training.losses import draw_sample as _draw

__all__ = [
    "VALIDATION_BINS",
    "TrainResult",
    "apply_model_options",
    "diffusion_loss",
    "make_accelerator",
    "run_engine_training",
    "run_training",
    "trainable_parameters",
    "validation_losses",
]

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



@dataclass
class _Run:
    """What :func:`run_training` sets up once and its steps share."""

    config: TrainConfig
    accelerator: Any
    params: dict[str, nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    total: int
    work_dir: Path
    fingerprint: dict[str, Any]
    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    prepared: Any = None
    unwrapped: Any = None
    null_rows: torch.Tensor | None = None
    mask_dropout: float | None = None
    mask_loss_weight: float = 1.0

    @property
    def checkpoints_dir(self) -> Path:
        return self.work_dir / "checkpoints"


def _latest_to_resume(
    work_dir: Path, fingerprint: dict[str, Any], resume: bool
) -> Checkpoint | None:
    """The checkpoint to continue from; checkpoints without ``resume`` are refused."""
    latest = latest_checkpoint(work_dir / "checkpoints")
    if latest is not None and not resume:
        raise EngineError(
            f"holds checkpoints of an earlier run (last: step {latest.step}); pass --resume "
            "to continue it or choose another work folder",
            path=work_dir,
        )
    if latest is not None:
        _check_resume(latest, fingerprint)
    return latest


def _set_up(
    model: nn.Module,
    train_count: int,
    latest: Checkpoint | None,
    *,
    config: TrainConfig,
    device: torch.device | None,
    work_dir: Path,
    fingerprint: dict[str, Any],
) -> _Run:
    """Accelerator, optimizer, LR schedule and EMA for ``model``; the ``latest``
    checkpoint restored; the model prepared (compiled if asked)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    accelerator = make_accelerator(config, device)
    total = config.total_steps(train_count, accelerator.num_processes)
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
    run = _Run(
        config, accelerator, params, optimizer, lr_scheduler, ema, total, work_dir, fingerprint
    )
    if latest is not None:
        _restore(run, latest)
    if config.compile:
        model.compile()
    run.prepared, run.optimizer = accelerator.prepare(model, optimizer)
    run.unwrapped = accelerator.unwrap_model(run.prepared)
    run.null_rows = run.unwrapped.caption_projection.uncond_embedding.detach().float().cpu()
    if run.start >= total:
        raise EngineError(
            f"the run is already complete ({run.start} of {total} steps); raise --steps to "
            "train further",
            path=run.checkpoints_dir,
        )
    return run


def _restore(run: _Run, latest: Checkpoint) -> None:
    """Weights, optimizer, LR schedule, EMA and history of ``latest`` into ``run``."""
    weights = latest.weights()
    missing = sorted(set(run.params) - set(weights))
    if missing:
        raise EngineError(
            f"checkpoint lacks trainable weights {missing[:3]}", path=latest.folder
        )
    with torch.no_grad():
        for name, p in run.params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    run.optimizer.load_state_dict(latest.torch_state("optimizer"))
    run.lr_scheduler.load_state_dict(latest.torch_state("lr_scheduler"))
    if run.ema is not None:
        run.ema.load_state_dict(latest.torch_state("ema"))
    run.start, run.history, run.resumed_from = (
        latest.step, list(latest.state["history"]), latest.step
    )


@contextmanager
def _ema_weights(run: _Run) -> Iterator[None]:
    """The EMA weights in the model for the block (nothing changes without EMA)."""
    if run.ema is None:
        yield
        return
    run.ema.store(list(run.params.values()))
    run.ema.copy_to(list(run.params.values()))
    try:
        yield
    finally:
        run.ema.restore(list(run.params.values()))


def _validate(
    run: _Run, train_data: EncodedSamples, val_indices: Sequence[int], noise_scheduler: Any
) -> dict[str, float]:
    """:func:`validation_losses` of the (EMA) weights under the run's autocast."""
    with _ema_weights(run), run.accelerator.autocast():
        return validation_losses(
            run.unwrapped,
            train_data,
            val_indices,
            noise_scheduler,
            seed=run.config.seed,
            batch_size=run.config.batch_size,
            timestep_range=run.config.timestep_range,
            mask_dropout=None if run.mask_dropout is None else 0.0,
        )


def _write_checkpoint(
    run: _Run,
    step: int,
    metrics: dict[str, float],
    on_checkpoint: Callable[[nn.Module, int], None] | None,
) -> None:
    """On the main process: checkpoint ``step``, keep the best, rewrite the log and
    call ``on_checkpoint`` (unless samples have their own interval); then all wait."""
    if run.accelerator.is_main_process:
        state = {
            "fingerprint": run.fingerprint,
            "history": run.history,
            "val_loss": metrics.get("val_loss"),
            "total_steps": run.total,
        }
        write_checkpoint(
            run.checkpoints_dir,
            step,
            weights={n: p.detach() for n, p in run.params.items()},
            states={
                "optimizer": run.optimizer.state_dict(),
                "lr_scheduler": run.lr_scheduler.state_dict(),
                "ema": None if run.ema is None else run.ema.state_dict(),
            },
            state=state,
        )
        prune_checkpoints(run.checkpoints_dir, run.config.keep_best)
        _write_log(run.work_dir, run.history)
        if on_checkpoint is not None and (run.config.sample_every is None):
            with _ema_weights(run):
                on_checkpoint(run.unwrapped, step)
    run.accelerator.wait_for_everyone()


def _micro_batch(
    run: _Run, train_data: EncodedSamples, train_indices: Sequence[int], step: int, micro: int
) -> dict[str, Any]:
    """This process's share of micro-batch ``micro`` of ``step``, collated."""
    config = run.config
    picks = step_indices(
        train_indices,
        seed=config.seed,
        step=step,
        micro=micro,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        processes=run.accelerator.num_processes,
        rank=run.accelerator.process_index,
    )
    draws = [
        _draw(
            train_data,
            index,
            sample_generator(config.seed, "train", epoch, pos),
            timestep_range=config.timestep_range,
            uncond_prob=config.uncond_prob,
            mask_dropout=run.mask_dropout,
        )
        for index, epoch, pos in picks
    ]
    return collate(draws)


def _train_step(
    run: _Run,
    step: int,
    train_data: EncodedSamples,
    train_indices: Sequence[int],
    noise_scheduler: Any,
) -> float:
    """One optimizer step (``grad_accum`` micro-batches); the mean loss of all processes."""
    config, accelerator = run.config, run.accelerator
    running = torch.zeros((), dtype=torch.float64)
    for micro in range(config.grad_accum):
        batch = _micro_batch(run, train_data, train_indices, step, micro)
        with accelerator.accumulate(run.prepared):
            losses = diffusion_loss(
                run.prepared,
                batch,
                noise_scheduler,
                snr_gamma=config.snr_gamma,
                null_rows=run.null_rows,
                mask_loss_weight=run.mask_loss_weight,
            )
            loss = losses.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        running += loss.detach().double().cpu() / config.grad_accum
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.step(list(run.params.values()))
    mean_loss = float(accelerator.reduce(running.to(accelerator.device), "mean"))
    if not math.isfinite(mean_loss):
        raise EngineError(
            f"the training loss became {mean_loss} at step {step + 1}; "
            "lower --lr or use another --mixed-precision",
            item="loss",
        )
    return mean_loss


def _finish(run: _Run, metrics: dict[str, float], seconds: float, samples: int) -> TrainResult:
    """The EMA weights into the model; the measurements of the run (``seconds`` of
    training, ``samples`` trained on by all processes)."""
    if run.ema is not None:
        run.ema.copy_to(list(run.params.values()))
    final = dict(metrics)
    for record in run.history:  # the initial loss of a resumed run is in its history
        if record["step"] == 0 and "val_loss" in record:
            final.setdefault("val_loss_initial", record["val_loss"])
    accelerator = run.accelerator
    peak = torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda" else None
    accelerator.wait_for_everyone()
    return TrainResult(
        steps=run.total,
        metrics=final,
        history=run.history,
        seconds=seconds,
        images_per_second=samples / seconds if seconds > 0 else 0.0,
        peak_memory_bytes=peak,
        resumed_from=run.resumed_from,
        work_dir=run.work_dir,
        main_process=accelerator.is_main_process,
    )


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
    mask_dropout: float | None = None,
    mask_loss_weight: float = 1.0,
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
        mask_dropout: a ControlNet's training (``model`` takes ``controlnet_cond``): the
            samples' masks go in, each dropped to the null mask with this probability;
            validation uses every mask.
        mask_loss_weight: with ``mask_dropout``, the training loss's weight of the latent
            cells a vessel touches (1 elsewhere; validation stays unweighted).
    """

    work_dir = Path(work_dir)
    if not train_indices:
        raise EngineError("no training samples (the dataset is empty)", item="dataset")
    fingerprint = {**fingerprint, "config": config.fingerprint()}
    latest = _latest_to_resume(work_dir, fingerprint, resume)
    run = _set_up(
        model,
        len(train_indices),
        latest,
        config=config,
        device=device,
        work_dir=work_dir,
        fingerprint=fingerprint,
    )
    run.mask_dropout = mask_dropout
    run.mask_loss_weight = float(mask_loss_weight)
    accelerator, total = run.accelerator, run.total
    work_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    if run.start == 0 and accelerator.is_main_process:
        initial = _validate(run, train_data, val_indices, noise_scheduler)
        metrics = {f"{k}_initial": v for k, v in initial.items() if k == "val_loss"}
        run.history.append({"step": 0, **initial})
    bar = progress(total=total, initial=run.start) if progress is not None else None
    run.prepared.train()
    began, samples = time.perf_counter(), 0
    validate_every = config.validate_every or config.checkpoint_every
    for step in range(run.start, total):
        mean_loss = _train_step(run, step, train_data, train_indices, noise_scheduler)
        samples += config.batch_size * config.grad_accum * accelerator.num_processes
        record = {"step": step + 1, "loss": mean_loss, "lr": run.lr_scheduler.get_last_lr()[0]}
        done = step + 1
        if (done % validate_every == 0 or done == total) and accelerator.is_main_process:
            metrics = _validate(run, train_data, val_indices, noise_scheduler)
            record.update(metrics)
        run.history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            bar.update(1)
        if done % config.checkpoint_every == 0 or done == total:
            _write_checkpoint(run, done, metrics, on_checkpoint)
        if (
            config.sample_every
            and on_checkpoint is not None
            and accelerator.is_main_process
            and done % config.sample_every == 0
        ):
            on_checkpoint(run.unwrapped, done)
    seconds = time.perf_counter() - began
    if bar is not None:
        bar.close()
    return _finish(run, metrics, seconds, samples)


def run_engine_training(
    engine: Any,
    model: nn.Module,
    data: EncodedSamples,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    config: TrainConfig,
    work_dir: str | Path,
    fingerprint: dict[str, Any],
    resume: bool,
    on_checkpoint: Callable[[Any, int], None] | None,
    progress: Callable[..., Any] | None,
    mask_dropout: float | None = None,
    mask_loss_weight: float = 1.0,
) -> TrainResult:
    """:func:`run_training` of ``model`` with ``engine``'s DDPM schedule on its device;
    ``model`` is left in eval mode without gradients (LoRA and full fine-tuning alike)."""
    result = run_training(
        model,
        data,
        train_indices,
        val_indices,
        config=config,
        noise_scheduler=engine.make_scheduler("ddpm"),
        work_dir=Path(work_dir),
        fingerprint=fingerprint,
        resume=resume,
        device=engine.device,
        on_checkpoint=on_checkpoint,
        progress=progress,
        mask_dropout=mask_dropout,
        mask_loss_weight=mask_loss_weight,
    )
    model.eval().requires_grad_(False)
    return result


def kept_checkpoints(work_dir: Path) -> list[int]:
    """Steps of the checkpoints in ``work_dir`` (for reports and tests)."""
    return [c.step for c in find_checkpoints(Path(work_dir) / "checkpoints")]
