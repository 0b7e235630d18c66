"""``histosynth train lora`` / ``histosynth train full``: adapters and fine-tuning from a cache.

The commands compose the feature cache (or on-the-fly encoding of a dataset folder),
the engine and the trainer in :mod:`histosynth.synthesis.training`. They run as one
process or under ``accelerate launch`` (``accelerate launch -m histosynth train lora …``),
where every process trains on its share of each batch and only the main one writes.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path
from typing import Any

import click

from histosynth.integration.errors import InputError
from histosynth.options import SEED_MAX, FiniteFloat
from histosynth.progress import step_progress_for
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
            click.option(
                "--dataset",
                "dataset",
                type=click.Path(path_type=Path),
                help="Instead of --cache: a dataset folder (index.csv + images), "
                "encoded on the fly at every step (slower; the baseline).",
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
            click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True),
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
            click.option(
                "--device",
                default=None,
                help="cpu, cuda, cuda:1 … (default: CUDA when available; the "
                "process's GPU under accelerate launch).",
            ),
            click.option(
                "--resume",
                is_flag=True,
                help="Continue from the last checkpoint in the work folder.",
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _config(opts: dict[str, Any]):
    from histosynth.synthesis.training import TrainConfig

    if opts["steps"] is None and opts["epochs"] is None:
        raise click.UsageError("give --steps or --epochs")
    if opts["steps"] is not None and opts["epochs"] is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    return TrainConfig(
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


# --------------------------------------------------------------------------- shared steps


def _device(choice: str | None) -> str | None:
    """The process's device: its own GPU under a multi-process launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        cpu = choice == "cpu" or not torch.cuda.is_available()
        return str(PartialState(cpu=cpu).device)
    return choice


def _samples(opts: dict[str, Any], engine: Any, transformer: Any, resolution: int):
    """``(samples, train indices, val indices, checksum)`` from --cache or --dataset, for
    ``transformer`` (the engine's, or the grown one of ``train full``) at ``resolution``."""
    from histosynth.synthesis.adapters import base_weight_hash
    from histosynth.synthesis.training import check_samples_fit, split_indices

    cache, dataset = opts["cache"], opts["dataset"]
    if (cache is None) == (dataset is None):
        raise click.UsageError("give either --cache or --dataset")
    cfg = transformer.config
    if cache is not None:
        from histosynth.synthesis.cache import CacheDataset, read_cache_info

        if not Path(cache).is_file():
            raise InputError("no such cache file", path=cache, item="--cache")
        info = read_cache_info(cache)
        check_samples_fit(
            info,
            resolution=resolution,
            tokens=int(cfg.caption_num_tokens),
            dim=int(cfg.caption_channels),
            latent_channels=int(cfg.in_channels),
            vae_hash=base_weight_hash(engine.vae),
            encoder_hash=base_weight_hash(engine.encoder),
        )
        data = CacheDataset(
            cache, resolution=resolution, preload=opts["preload"], seed=opts["seed"]
        )
        checksum = info.content_hash
    else:
        from histosynth.cache import dataset_tiles
        from histosynth.synthesis.cache import OnTheFlyDataset

        tiles = list(dataset_tiles(dataset))
        if not tiles:
            raise InputError("holds no tiles to train on", path=dataset, item="--dataset")
        data = OnTheFlyDataset(
            [t.image for t in tiles],
            [t.mask for t in tiles],
            codec=engine.codec,
            encoder=engine.encoder,
            resolution=resolution,
            tile_ids=[t.tile_id for t in tiles],
            seed=opts["seed"],
        )
        digest = hashlib.sha256()
        for tile in tiles:
            digest.update(
                f"{tile.tile_id}\0{hashlib.sha256(tile.image.tobytes()).hexdigest()}\n".encode()
            )
        checksum = digest.hexdigest()
    if len(data) == 0:
        raise InputError("holds no samples", path=cache or dataset)
    train_ids, val_ids = split_indices(len(data), opts["val_fraction"], opts["seed"])
    return data, train_ids, val_ids, checksum


def _sample_writer(
    engine: Any, data: Any, val_ids: list[int], work_dir: Path, seed: int, steps: int
):
    """``on_checkpoint(model, step)`` writing ``work_dir/samples/step-<N>.png``."""
    from histosynth.common.files import atomic_write_bytes
    from histosynth.integration.images import encode_rgb_png
    from histosynth.synthesis.training import sample_grid

    indices = val_ids or list(range(min(len(data), 4)))

    def write(model: Any, step: int) -> None:
        grid = sample_grid(
            model, engine.vae, engine.make_scheduler(), data, indices, seed=seed, steps=steps
        )
        png = encode_rgb_png(grid, f"samples at step {step}")
        atomic_write_bytes(work_dir / "samples" / f"step-{step:08d}.png", png)

    return write


def _describe(result: Any) -> str:
    m = result.metrics
    loss = ""
    if "val_loss" in m:
        first = m.get("val_loss_initial")
        loss = (
            f"held-out loss {first:.4f} → {m['val_loss']:.4f}; "
            if first is not None
            else f"held-out loss {m['val_loss']:.4f}; "
        )
    return (
        f"{loss}{result.steps} steps, {result.seconds:.1f} s in this run, "
        f"{result.images_per_second:.2f} samples/s"
    )


# --------------------------------------------------------------------------- commands


@click.group()
def train() -> None:
    """Train LoRA style adapters and fine-tune the engine, from a feature cache."""


@train.command("lora")
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
    from histosynth.synthesis.adapters import adapter_library, validate_adapter_name
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.training import train_lora

    config = _config(opts)
    validate_adapter_name(name)
    folder = (library.expanduser() if library else adapter_library()) / name
    if folder.exists() and not overwrite:
        raise InputError(
            f"an adapter named {name!r} already exists; pass --overwrite to replace it",
            path=folder,
            item="--name",
        )
    work_dir = opts["work_dir"] or Path(f"train-lora-{name}")
    engine = load_engine(base, device=_device(opts["device"]), dtype="float32")
    resolution = int(engine.transformer.config.sample_size) * engine.codec.downsample
    data, train_ids, val_ids, checksum = _samples(opts, engine, engine.transformer, resolution)
    info, result = train_lora(
        engine,
        data,
        train_ids,
        val_ids,
        name=name,
        folder=folder,
        config=config,
        work_dir=work_dir,
        rank=rank,
        alpha=alpha,
        domain=domain,
        training_data_checksum=checksum,
        overwrite=overwrite,
        resume=opts["resume"],
        on_checkpoint=_sample_writer(
            engine, data, val_ids, work_dir, config.seed, config.sample_steps
        ),
        progress=step_progress_for(ctx, f"train lora {name}"),
    )
    if info is not None:
        click.echo(f"adapter {name!r} saved to {folder}: {_describe(result)}")
        click.echo(
            f"use it: histosynth synthesize … --model {shlex.quote(base)} "
            f"--adapter {shlex.quote(name)}"
        )


@train.command("full")
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
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="Engine folder to write (loads with --model OUT).",
)
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
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.training import grow_transformer, train_full

    config = _config(opts)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            "exists and is not an empty folder; not overwriting it", path=out, item="--out"
        )
    work_dir = opts["work_dir"] or out.with_name(out.name + "-training")
    engine = load_engine(from_, device=_device(opts["device"]), dtype="float32")
    # the grown model's shape decides which samples fit; checked before any training
    grown = grow_transformer(engine.transformer, resolution, null_condition=null_condition)
    data, train_ids, val_ids, checksum = _samples(opts, engine, grown, resolution)
    del grown
    written, result = train_full(
        engine,
        data,
        train_ids,
        val_ids,
        resolution=resolution,
        out=out,
        config=config,
        work_dir=work_dir,
        null_condition=null_condition,
        training_data_checksum=checksum,
        resume=opts["resume"],
        progress=step_progress_for(ctx, f"train full {resolution}px"),
    )
    if written is not None:
        click.echo(f"engine saved to {written}: {_describe(result)}")
        click.echo(f"use it: histosynth synthesize … --model {shlex.quote(str(written))}")
