"""``histosynth train lora`` / ``controlnet`` / ``full``: adapters, ControlNets and
fine-tuning from a feature cache (the work: :mod:`histosynth.workflows.train`).

They run as one process or under ``accelerate launch`` (``accelerate launch -m histosynth
train lora …``), where every process trains on its share of each batch and only the main
one writes (and prints).
"""

from __future__ import annotations

import shlex
from typing import Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    Decorator,
    FiniteFloat,
    batch_size_option,
    dataset_option,
    device_option,
    kv_compress_option,
    out_option,
    path_option,
    resume_option,
    seed_option,
    stacked,
    value_option,
    whole_number_option,
)
from histosynth.commands.progress import step_progress_for
from histosynth.commands.to_workflow import settings_from
from histosynth.synthesis.training.config import LR_SCHEDULERS

# --------------------------------------------------------------------------- options


def _fraction_option(decl: str, default: float, help: str) -> Decorator:
    """An option taking a share of the samples, in [0, 1)."""
    return value_option(decl, type=FiniteFloat(0, 1, max_open=True), default=default, help=help)


def _data_options() -> list[Decorator]:
    """Where the training samples come from."""
    return [
        path_option("--cache", "cache", help="Feature cache (histosynth cache build)."),
        dataset_option(
            "Instead of --cache: a dataset folder (index.csv + images), "
            "encoded on the fly at every step (slower; the baseline)."
        ),
    ]


def _optimiser_options(lr: float) -> list[Decorator]:
    """The optimiser, its schedule and how many steps of how many samples."""
    positive = FiniteFloat(min=0, min_open=True)
    return [
        value_option("--lr", type=positive, default=lr, help="AdamW learning rate."),
        value_option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS), default="constant"),
        whole_number_option(
            "--warmup-steps", low=0, default=0, help="Learning-rate warm-up steps."
        ),
        value_option("--weight-decay", type=FiniteFloat(min=0), default=0.0),
        whole_number_option("--steps", low=1, help="Optimiser steps (or --epochs)."),
        value_option("--epochs", type=positive, help="Passes over the training samples."),
        batch_size_option("Samples per process per forward.", default=4),
        whole_number_option("--grad-accum", low=1, default=1, help="Forwards per optimiser step."),
        value_option(
            "--mixed-precision",
            type=click.Choice(["no", "fp16", "bf16"]),
            default="no",
            help="Autocast precision (fp16 needs CUDA); weights stay float32.",
        ),
    ]


def _objective_options() -> list[Decorator]:
    """What the loss sees: condition dropout, timestep weighting and range."""
    return [
        _fraction_option(
            "--uncond-prob", 0.1, "Condition dropout to the learned null condition (CFG)."
        ),
        value_option(
            "--snr-gamma",
            type=FiniteFloat(min=0),
            default=5.0,
            help="Min-SNR-γ weighting; 0 = plain MSE.",
        ),
        value_option(
            "--timesteps",
            type=(click.IntRange(0, 999), click.IntRange(1, 1000)),
            default=(0, 1000),
            help="Train on timesteps LOW ≤ t < HIGH.",
        ),
    ]


def _model_options() -> list[Decorator]:
    """How the model runs (speed, memory) and the EMA of its weights."""
    return [
        kv_compress_option("KV-compression ratio R of self-attention (1 = off)."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the model."),
        value_option(
            "--attention", type=click.Choice(["auto", "sdpa", "xformers"]), default="auto"
        ),
        click.option(
            "--gradient-checkpointing",
            is_flag=True,
            help="Recompute activations in the backward pass (less memory).",
        ),
        click.option("--ema", is_flag=True, help="Keep and save an EMA of the weights."),
        value_option(
            "--ema-decay", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.999
        ),
    ]


def _run_options(checkpoint_every: int) -> list[Decorator]:
    """Validation, checkpoints, samples and the run's folder and device."""
    return [
        _fraction_option("--val-fraction", 0.05, "Share of the samples held out for validation."),
        seed_option(),
        whole_number_option(
            "--checkpoint-every",
            low=1,
            default=checkpoint_every,
            help="Steps between checkpoints and validations.",
        ),
        whole_number_option(
            "--keep-best",
            low=0,
            default=2,
            help="Checkpoints kept besides the last (lowest validation loss).",
        ),
        whole_number_option(
            "--sample-every",
            low=0,
            help="Steps between sample grids (default: every checkpoint; 0: never).",
        ),
        click.option(
            "--preload",
            is_flag=True,
            help="Read the whole cache into memory first (checked against free memory).",
        ),
        path_option(
            "--work-dir", help="Checkpoints, samples and metrics.jsonl (default: see above)."
        ),
        device_option(
            "cpu, cuda, cuda:1 … (default: CUDA when available; the "
            "process's GPU under accelerate launch)."
        ),
        resume_option("Continue from the last checkpoint in the work folder."),
    ]


def _training_options(lr: float, checkpoint_every: int = 100) -> Decorator:
    """The flags ``train lora`` and ``train full`` share (``lr`` default differs), in the
    order ``--help`` lists them."""
    return stacked(
        *_data_options(),
        *_optimiser_options(lr),
        *_objective_options(),
        *_model_options(),
        *_run_options(checkpoint_every),
    )


def _training_run(opts: dict[str, Any]):
    """The workflow's ``TrainingRun`` from the shared flags (usage errors first)."""
    from histosynth.synthesis.training import TrainConfig
    from histosynth.workflows.train import TrainingRun

    if opts["steps"] is None and opts["epochs"] is None:
        raise click.UsageError("give --steps or --epochs")
    if opts["steps"] is not None and opts["epochs"] is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    config = settings_from(
        TrainConfig,
        opts,
        lr_warmup_steps=opts["warmup_steps"],
        snr_gamma=opts["snr_gamma"] or None,
        timestep_range=tuple(opts["timesteps"]),
        compile=opts["compile_"],
    )
    if (opts["cache"] is None) == (opts["dataset"] is None):
        raise click.UsageError("give either --cache or --dataset")
    return settings_from(TrainingRun, opts, config=config)


# --------------------------------------------------------------------------- commands


@click.group(context_settings=HELP_CONTEXT)
def train() -> None:
    """Train LoRA style adapters, vessel-mask ControlNets and fine-tune the engine, from a
    feature cache."""


@train.command("lora", context_settings=HELP_CONTEXT)
@click.option("--base", "-m", required=True, help="Base engine: a preset or an engine folder.")
@click.option("--name", required=True, help="Adapter name in the library.")
@click.option("--domain", default="", help="What the adapter is for (stain, scanner, tissue).")
@whole_number_option("--rank", low=1, default=4)
@value_option("--alpha", type=FiniteFloat(min=0, min_open=True), default=4.0)
@path_option(
    "--library",
    help="Adapter library (default $HISTOSYNTH_ADAPTERS or ~/.local/share/histosynth/adapters).",
)
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name.")
@_training_options(lr=1e-4)
@click.pass_context
def lora(ctx: click.Context, base: str, name: str, **opts: Any) -> None:
    """Train a LoRA style adapter (cross-attention only) into the adapter library.

    Its work folder (default ./train-lora-NAME) holds checkpoints, sample grids and
    metrics.jsonl; --resume continues an interrupted run exactly. The adapter works at
    once with `histosynth synthesize --adapter NAME`.
    """
    from histosynth.workflows.train import LoraSettings, describe_training, train_lora_adapter

    run = _training_run(opts)
    settings = settings_from(LoraSettings, opts, base=base, name=name)
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


@train.command("controlnet", context_settings=HELP_CONTEXT)
@click.option("--base", "-m", required=True, help="Base engine: a preset or an engine folder.")
@click.option("--name", required=True, help="ControlNet name in the library.")
@whole_number_option(
    "--layers", low=1, default=2, help="Base blocks the ControlNet copies (1..the base's)."
)
@_fraction_option(
    "--mask-dropout", 0.1, "Mask dropout to the null mask (its own guidance scale)."
)
@value_option(
    "--mask-loss-weight",
    type=FiniteFloat(1, 100),
    default=1.0,
    help="Loss weight of the latent cells a vessel touches (1 elsewhere; 1 = plain).",
)
@path_option(
    "--library",
    help="ControlNet library (default $HISTOSYNTH_CONTROLNETS or "
    "~/.local/share/histosynth/controlnets).",
)
@click.option("--overwrite", is_flag=True, help="Replace a ControlNet of the same name.")
@_training_options(lr=1e-4)
@click.pass_context
def controlnet(ctx: click.Context, base: str, name: str, **opts: Any) -> None:
    """Train a vessel-mask ControlNet on the base's frozen transformer into the library.

    Each cached tile brings its vessel mask (tiles without vessels train "no vessel
    here"); the UNI rows (--uncond-prob) and the mask (--mask-dropout) are dropped
    independently so that each gets its own guidance scale. The work folder (default
    ./train-controlnet-NAME) holds checkpoints, sample grids and metrics.jsonl; --resume
    continues an interrupted run exactly. Use it with `histosynth synthesize --mode shape
    --controlnet NAME`.
    """
    from histosynth.workflows.train import (
        ControlNetSettings,
        describe_training,
        train_controlnet_model,
    )

    run = _training_run(opts)
    settings = settings_from(ControlNetSettings, opts, base=base, name=name)
    trained = train_controlnet_model(
        settings, run, progress=step_progress_for(ctx, f"train controlnet {name}")
    )
    if trained.info is not None:
        click.echo(
            f"ControlNet {name!r} saved to {trained.folder}: "
            f"{describe_training(trained.result)}"
        )
        click.echo(
            f"use it: histosynth synthesize … --model {shlex.quote(base)} --mode shape "
            f"--controlnet {shlex.quote(name)}"
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
@value_option(
    "--null-condition",
    type=click.Choice(["tile", "reinit"]),
    default="tile",
    help="Grow the learned null condition by tiling it, or draw it anew.",
)
@_training_options(lr=1e-6)
@click.pass_context
def full(ctx: click.Context, from_: str, resolution: int, **opts: Any) -> None:
    """Fine-tune every weight at --resolution, starting from a lower-resolution engine.

    Position embeddings are recomputed for the new grid and the condition grows from 1
    to 4 to 16 rows as the tile grows from 256 to 512 to 1024 px (one row per crop).
    The work folder (default OUT-training) holds checkpoints, samples and metrics.jsonl.
    """
    from histosynth.workflows.train import FullSettings, describe_training, train_full_engine

    run = _training_run(opts)
    settings = settings_from(FullSettings, opts, start=from_, resolution=resolution)
    trained = train_full_engine(
        settings, run, progress=step_progress_for(ctx, f"train full {resolution}px")
    )
    if trained.written is not None:
        click.echo(f"engine saved to {trained.written}: {describe_training(trained.result)}")
        click.echo(f"use it: histosynth synthesize … --model {shlex.quote(str(trained.written))}")
