"""``histosynth train lora`` / ``histosynth train full``: adapters and fine-tuning from a
feature cache (the work: :mod:`histosynth.workflows.train`).

They run as one process or under ``accelerate launch`` (``accelerate launch -m histosynth
train lora …``), where every process trains on its share of each batch and only the main
one writes (and prints).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    FiniteFloat,
    dataset_option,
    device_option,
    out_option,
    resume_option,
    seed_option,
)
from histosynth.commands.progress import step_progress_for
from histosynth.synthesis.training.config import LR_SCHEDULERS

# --------------------------------------------------------------------------- options


def _training_options(lr: float, checkpoint_every: int = 100):
    """The flags ``train lora`` and ``train full`` share (``lr`` default differs)."""

    def decorate(func):
        options = [
            click.option(
                "--cache",
                "cache",
                type=click.Path(path_type=Path),
                help="Feature cache (histosynth cache build).",
            ),
            dataset_option(
                "Instead of --cache: a dataset folder (index.csv + images), "
                "encoded on the fly at every step (slower; the baseline)."
            ),
            click.option(
                "--lr",
                type=FiniteFloat(min=0, min_open=True),
                default=lr,
                show_default=True,
                help="AdamW learning rate.",
            ),
            click.option(
                "--lr-scheduler",
                default="constant",
                show_default=True,
                type=click.Choice(LR_SCHEDULERS),
            ),
            click.option(
                "--warmup-steps",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Learning-rate warm-up steps.",
            ),
            click.option("--weight-decay", type=FiniteFloat(min=0), default=0.0, show_default=True),
            click.option(
                "--steps",
                type=click.IntRange(min=1),
                default=None,
                help="Optimiser steps (or --epochs).",
            ),
            click.option(
                "--epochs",
                type=FiniteFloat(min=0, min_open=True),
                default=None,
                help="Passes over the training samples.",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=4,
                show_default=True,
                help="Samples per process per forward.",
            ),
            click.option(
                "--grad-accum",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="Forwards per optimiser step.",
            ),
            click.option(
                "--mixed-precision",
                type=click.Choice(["no", "fp16", "bf16"]),
                default="no",
                show_default=True,
                help="Autocast precision (fp16 needs CUDA); weights stay float32.",
            ),
            click.option(
                "--uncond-prob",
                type=FiniteFloat(0, 1, max_open=True),
                default=0.1,
                show_default=True,
                help="Condition dropout to the learned null condition (CFG).",
            ),
            click.option(
                "--snr-gamma",
                type=FiniteFloat(min=0),
                default=5.0,
                show_default=True,
                help="Min-SNR-γ weighting; 0 = plain MSE.",
            ),
            click.option(
                "--timesteps",
                type=(click.IntRange(0, 999), click.IntRange(1, 1000)),
                default=(0, 1000),
                show_default=True,
                help="Train on timesteps LOW ≤ t < HIGH.",
            ),
            click.option(
                "--kv-compress",
                type=click.IntRange(min=1),
                default=None,
                help="KV-compression ratio R of self-attention (1 = off).",
            ),
            click.option("--compile", "compile_", is_flag=True, help="torch.compile the model."),
            click.option(
                "--attention",
                type=click.Choice(["auto", "sdpa", "xformers"]),
                default="auto",
                show_default=True,
            ),
            click.option(
                "--gradient-checkpointing",
                is_flag=True,
                help="Recompute activations in the backward pass (less memory).",
            ),
            click.option("--ema", is_flag=True, help="Keep and save an EMA of the weights."),
            click.option(
                "--ema-decay",
                type=FiniteFloat(0, 1, min_open=True, max_open=True),
                default=0.999,
                show_default=True,
            ),
            click.option(
                "--val-fraction",
                type=FiniteFloat(0, 1, max_open=True),
                default=0.05,
                show_default=True,
                help="Share of the samples held out for validation.",
            ),
            seed_option(),
            click.option(
                "--checkpoint-every",
                type=click.IntRange(min=1),
                default=checkpoint_every,
                show_default=True,
                help="Steps between checkpoints and validations.",
            ),
            click.option(
                "--keep-best",
                type=click.IntRange(min=0),
                default=2,
                show_default=True,
                help="Checkpoints kept besides the last (lowest validation loss).",
            ),
            click.option(
                "--sample-every",
                type=click.IntRange(min=0),
                default=None,
                help="Steps between sample grids (default: every checkpoint; 0: never).",
            ),
            click.option(
                "--preload",
                is_flag=True,
                help="Read the whole cache into memory first (checked against free memory).",
            ),
            click.option(
                "--work-dir",
                type=click.Path(path_type=Path),
                default=None,
                help="Checkpoints, samples and metrics.jsonl (default: see above).",
            ),
            device_option(
                "cpu, cuda, cuda:1 … (default: CUDA when available; the "
                "process's GPU under accelerate launch)."
            ),
            resume_option("Continue from the last checkpoint in the work folder."),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _training_run(opts: dict[str, Any]):
    """The workflow's ``TrainingRun`` from the shared flags (usage errors first)."""
    from histosynth.synthesis.training import TrainConfig
    from histosynth.workflows.train import TrainingRun

    if opts["steps"] is None and opts["epochs"] is None:
        raise click.UsageError("give --steps or --epochs")
    if opts["steps"] is not None and opts["epochs"] is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    config = TrainConfig(
        steps=opts["steps"],
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        grad_accum=opts["grad_accum"],
        lr=opts["lr"],
        lr_scheduler=opts["lr_scheduler"],
        lr_warmup_steps=opts["warmup_steps"],
        weight_decay=opts["weight_decay"],
        mixed_precision=opts["mixed_precision"],
        uncond_prob=opts["uncond_prob"],
        snr_gamma=opts["snr_gamma"] or None,
        timestep_range=tuple(opts["timesteps"]),
        kv_compress=opts["kv_compress"],
        compile=opts["compile_"],
        attention=opts["attention"],
        gradient_checkpointing=opts["gradient_checkpointing"],
        ema=opts["ema"],
        ema_decay=opts["ema_decay"],
        val_fraction=opts["val_fraction"],
        seed=opts["seed"],
        checkpoint_every=opts["checkpoint_every"],
        keep_best=opts["keep_best"],
        sample_every=opts["sample_every"],
    )
    if (opts["cache"] is None) == (opts["dataset"] is None):
        raise click.UsageError("give either --cache or --dataset")
    return TrainingRun(
        config=config,
        cache=opts["cache"],
        dataset=opts["dataset"],
        preload=opts["preload"],
        work_dir=opts["work_dir"],
        device=opts["device"],
        resume=opts["resume"],
    )


# --------------------------------------------------------------------------- commands


@click.group(context_settings=HELP_CONTEXT)
def train() -> None:
    """Train LoRA style adapters and fine-tune the engine, from a feature cache."""


@train.command("lora", context_settings=HELP_CONTEXT)
@click.option("--base", "-m", required=True, help="Base engine: a preset or an engine folder.")
@click.option("--name", required=True, help="Adapter name in the library.")
@click.option("--domain", default="", help="What the adapter is for (stain, scanner, tissue).")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--alpha", type=FiniteFloat(min=0, min_open=True), default=4.0, show_default=True)
@click.option(
    "--library",
    type=click.Path(path_type=Path),
    default=None,
    help="Adapter library (default $HISTOSYNTH_ADAPTERS or ~/.local/share/histosynth/adapters).",
)
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name.")
@_training_options(lr=1e-4)
@click.pass_context
def lora(
    ctx: click.Context,
    base: str,
    name: str,
    domain: str,
    rank: int,
    alpha: float,
    library: Path | None,
    overwrite: bool,
    **opts: Any,
) -> None:
    """Train a LoRA style adapter (cross-attention only) into the adapter library.

    Its work folder (default ./train-lora-NAME) holds checkpoints, sample grids and
    metrics.jsonl; --resume continues an interrupted run exactly. The adapter works at
    once with `histosynth synthesize --adapter NAME`.
    """
    from histosynth.workflows.train import LoraSettings, describe_training, train_lora_adapter

    run = _training_run(opts)
    settings = LoraSettings(
        base=base,
        name=name,
        domain=domain,
        rank=rank,
        alpha=alpha,
        library=library,
        overwrite=overwrite,
    )
    trained = train_lora_adapter(
        settings, run, progress=step_progress_for(ctx, f"train lora {name}")
    )
    if trained.info is not None:
        click.echo(
            f"adapter {name!r} saved to {trained.folder}: {describe_training(trained.result)}"
        )
        click.echo(
            f"use it: histosynth synthesize … --model {shlex.quote(base)} "
            f"--adapter {shlex.quote(name)}"
        )


@train.command("full", context_settings=HELP_CONTEXT)
@click.option(
    "--from",
    "from_",
    required=True,
    help="Starting engine: a preset or an engine folder (e.g. trained at 256 px).",
)
@click.option(
    "--resolution",
    type=click.IntRange(64, 4096),
    required=True,
    help="Tile side to train at, px (256, 512, 1024; the crop grid must stay whole).",
)
@out_option("Engine folder to write (loads with --model OUT).")
@click.option(
    "--null-condition",
    type=click.Choice(["tile", "reinit"]),
    default="tile",
    show_default=True,
    help="Grow the learned null condition by tiling it, or draw it anew.",
)
@_training_options(lr=1e-6)
@click.pass_context
def full(
    ctx: click.Context, from_: str, resolution: int, out: Path, null_condition: str, **opts: Any
) -> None:
    """Fine-tune every weight at --resolution, starting from a lower-resolution engine.

    Position embeddings are recomputed for the new grid and the condition grows from 1
    to 4 to 16 rows as the tile grows from 256 to 512 to 1024 px (one row per crop).
    The work folder (default OUT-training) holds checkpoints, samples and metrics.jsonl.
    """
    from histosynth.workflows.train import FullSettings, describe_training, train_full_engine

    run = _training_run(opts)
    settings = FullSettings(
        start=from_, resolution=resolution, out=out, null_condition=null_condition
    )
    trained = train_full_engine(
        settings, run, progress=step_progress_for(ctx, f"train full {resolution}px")
    )
    if trained.written is not None:
        click.echo(f"engine saved to {trained.written}: {describe_training(trained.result)}")
        click.echo(f"use it: histosynth synthesize … --model {shlex.quote(str(trained.written))}")
