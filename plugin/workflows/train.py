"""Training workflows: LoRA style adapters (``histosynth train lora``), vessel-mask
ControlNets (``histosynth train controlnet``) and full fine-tuning at a new resolution
(``histosynth train full``), from a feature cache or a dataset folder encoded on the fly.

They compose the feature cache, the engine and the trainer in
:mod:`histosynth.synthesis.training`, and run as one process or under ``accelerate
launch`` (``accelerate launch -m histosynth train lora …``), where every process trains on
its share of each batch and only the main one writes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.integration.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.adapters import AdapterInfo
    from histosynth.synthesis.controlnet_library import ControlNetInfo
    from histosynth.synthesis.training import TrainConfig, TrainResult

__all__ = [
    "ControlNetSettings",
    "ControlNetTrained",
    "FullSettings",
    "FullTrained",
    "LoraSettings",
    "LoraTrained",
    "TrainingRun",
    "describe_training",
    "train_controlnet_model",
    "train_full_engine",
    "train_lora_adapter",
]

#: ``progress(total, initial=0)`` → a bar of optimiser steps (``update(n)``, ``close()``)
StepProgress = Callable[..., Any]


@dataclass(frozen=True)
class TrainingRun:
    """What ``train lora`` and ``train full`` share: the hyper-parameters (``config``), the
    samples — a feature cache (``cache``) or a dataset folder encoded on the fly at every
    step (``dataset``), exactly one; ``preload`` reads the whole cache into memory first —
    the work folder of checkpoints, sample grids and metrics.jsonl (``work_dir``;
    ``None``: the command's default), the ``device`` (``None``: CUDA when available; the
    process's GPU under a multi-process launch) and ``resume`` (from the last checkpoint
    in the work folder)."""

    config: TrainConfig
    cache: Path | None = None
    dataset: Path | None = None
    preload: bool = False
    work_dir: Path | None = None
    device: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if (self.cache is None) == (self.dataset is None):
            raise InputError("give either --cache or --dataset")


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA style adapter to train: ``base`` engine (preset or folder), its ``name`` in
    the adapter ``library`` (``None``: ``$HISTOSYNTH_ADAPTERS`` or
    ``~/.local/share/histosynth/adapters``), what it is for (``domain``), ``rank`` and
    ``alpha``; ``overwrite`` replaces an adapter of the same name."""

    base: str
    name: str
    domain: str = ""
    rank: int = 4
    alpha: float = 4.0
    library: Path | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ControlNetSettings:
    """A vessel-mask ControlNet to train: ``base`` engine (preset or folder), its ``name``
    in the ControlNet ``library`` (``None``: ``$HISTOSYNTH_CONTROLNETS`` or
    ``~/.local/share/histosynth/controlnets``), ``layers`` (base blocks copied) and
    ``mask_dropout`` (probability of the null mask), ``mask_loss_weight`` (the training
    loss's weight of the latent cells a vessel touches, 1 elsewhere); ``overwrite``
    replaces one of the same name."""

    base: str
    name: str
    layers: int = 2
    mask_dropout: float = 0.1
    mask_loss_weight: float = 1.0
    library: Path | None = None
    overwrite: bool = False


@dataclass
class ControlNetTrained:
    """What :func:`train_controlnet_model` did: the ControlNet's ``folder``, its ``info``
    (``None`` on processes other than the main one) and the trainer's ``result``."""

    folder: Path
    info: ControlNetInfo | None
    result: TrainResult


@dataclass(frozen=True)
class FullSettings:
    """A full fine-tuning: from the engine ``start`` (preset or folder) to a new engine
    folder ``out`` at ``resolution`` px; ``null_condition``: grow the learned null
    condition by tiling it (``tile``) or draw it anew (``reinit``)."""

    start: str
    resolution: int
    out: Path
    null_condition: str = "tile"


@dataclass
class LoraTrained:
    """What :func:`train_lora_adapter` did: the adapter's ``folder``, its ``info``
    (``None`` on processes other than the main one, which write nothing) and the
    trainer's ``result``."""

    folder: Path
    info: AdapterInfo | None
    result: TrainResult


@dataclass
class FullTrained:
    """What :func:`train_full_engine` did: the engine folder ``written`` (``None`` on
    processes other than the main one) and the trainer's ``result``."""

    written: Path | None
    result: TrainResult


def train_lora_adapter(
    settings: LoraSettings, run: TrainingRun, *, progress: StepProgress | None = None
) -> LoraTrained:
    """Train a LoRA style adapter (cross-attention only) into the adapter library.

    Its work folder (default ``./train-lora-NAME``) holds checkpoints, sample grids and
    metrics.jsonl; ``run.resume`` continues an interrupted run exactly.

    Raises:
        InputError: a bad adapter name, an adapter of that name without ``overwrite``,
            samples that do not fit the engine.
        EngineError: an unknown base engine or missing weights.
    """
    from histosynth.synthesis.adapters import adapter_library, validate_adapter_name
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.training import train_lora

    name = settings.name
    validate_adapter_name(name)
    library = settings.library
    folder = (library.expanduser() if library else adapter_library()) / name
    if folder.exists() and not settings.overwrite:
        raise InputError(
            f"an adapter named {name!r} already exists; pass --overwrite to replace it",
            path=folder,
            item="--name",
        )
    config = run.config
    work_dir = run.work_dir or Path(f"train-lora-{name}")
    engine = load_engine(settings.base, device=_device(run.device), dtype="float32")
    resolution = int(engine.transformer.config.sample_size) * engine.codec.downsample
    data, train_ids, val_ids, checksum = _samples(run, engine, engine.transformer, resolution)
    info, result = train_lora(
        engine,
        data,
        train_ids,
        val_ids,
        name=name,
        folder=folder,
        config=config,
        work_dir=work_dir,
        rank=settings.rank,
        alpha=settings.alpha,
        domain=settings.domain,
        training_data_checksum=checksum,
        overwrite=settings.overwrite,
        resume=run.resume,
        on_checkpoint=_sample_writer(
            engine, data, val_ids, work_dir, config.seed, config.sample_steps
        ),
        progress=progress,
    )
    return LoraTrained(folder, info, result)


def train_controlnet_model(
    settings: ControlNetSettings, run: TrainingRun, *, progress: StepProgress | None = None
) -> ControlNetTrained:
    """Train a vessel-mask ControlNet on the base's frozen transformer into the library.

    Every sample brings its mask (tiles without vessels train "no vessel here"); the UNI
    rows and the mask are dropped independently (``--uncond-prob``, ``--mask-dropout``).
    Its work folder (default ``./train-controlnet-NAME``) holds checkpoints, sample grids
    (held-out tiles, a mask, the tile re-generated under it) and metrics.jsonl.

    Raises:
        InputError: a bad name, a ControlNet of that name without ``overwrite``, more layers
            than the base has, samples that do not fit the engine or carry no masks.
        EngineError: an unknown base engine or missing weights.
    """
    from histosynth.synthesis.controlnet_library import (
        controlnet_library,
        validate_controlnet_name,
    )
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.training import check_masks, train_controlnet

    name = settings.name
    validate_controlnet_name(name)
    library = settings.library
    folder = (library.expanduser() if library else controlnet_library()) / name
    if folder.exists() and not settings.overwrite:
        raise InputError(
            f"a ControlNet named {name!r} already exists; pass --overwrite to replace it",
            path=folder,
            item="--name",
        )
    config = run.config
    work_dir = run.work_dir or Path(f"train-controlnet-{name}")
    engine = load_engine(settings.base, device=_device(run.device), dtype="float32")
    layers = int(engine.transformer.config.num_layers)
    if not 1 <= settings.layers <= layers:
        raise InputError(
            f"the base has {layers} blocks; a ControlNet copies 1..{layers} of them, not "
            f"{settings.layers}",
            item="--layers",
        )
    resolution = int(engine.transformer.config.sample_size) * engine.codec.downsample
    data, train_ids, val_ids, checksum = _samples(run, engine, engine.transformer, resolution)
    check_masks(data, train_ids, resolution)
    strength = float(engine.abilities.max_strength)  # what the sample grids regenerate
    info, result = train_controlnet(
        engine,
        data,
        train_ids,
        val_ids,
        name=name,
        folder=folder,
        config=config,
        work_dir=work_dir,
        layers=settings.layers,
        mask_dropout=settings.mask_dropout,
        mask_loss_weight=settings.mask_loss_weight,
        training_data_checksum=checksum,
        overwrite=settings.overwrite,
        resume=run.resume,
        on_checkpoint=_controlnet_sample_writer(
            engine, data, val_ids, work_dir, config, strength
        ),
        progress=progress,
    )
    return ControlNetTrained(folder, info, result)


def _controlnet_sample_writer(
    engine: Any, data: Any, val_ids: list[int], work_dir: Path, config: Any, strength: float
):
    """``on_checkpoint(model, step)`` writing ``work_dir/samples/step-<N>.png``."""
    from histosynth.common.files import atomic_write_bytes
    from histosynth.integration.images import encode_rgb_png
    from histosynth.synthesis.training import controlnet_sample_grid

    indices = val_ids or list(range(min(len(data), 4)))

    def write(model: Any, step: int) -> None:
        grid = controlnet_sample_grid(
            model,
            engine.vae,
            engine.make_scheduler(),
            data,
            indices,
            seed=config.seed,
            steps=config.sample_steps,
            strength=strength,
        )
        png = encode_rgb_png(grid, f"samples at step {step}")
        atomic_write_bytes(work_dir / "samples" / f"step-{step:08d}.png", png)

    return write


def train_full_engine(
    settings: FullSettings, run: TrainingRun, *, progress: StepProgress | None = None
) -> FullTrained:
    """Fine-tune every weight at ``settings.resolution``, starting from a lower-resolution
    engine; the new engine folder loads with ``--model OUT``.

    Position embeddings are recomputed for the new grid and the condition grows from 1
    to 4 to 16 rows as the tile grows from 256 to 512 to 1024 px (one row per crop). The
    work folder (default ``OUT-training``) holds checkpoints, samples and metrics.jsonl.

    Raises:
        InputError: ``out`` exists and is not an empty folder; samples that do not fit.
        EngineError: an unknown starting engine, missing weights, a resolution the model
            cannot take.
    """
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.training import grow_transformer, train_full

    out, resolution = settings.out, settings.resolution
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            "exists and is not an empty folder; not overwriting it", path=out, item="--out"
        )
    work_dir = run.work_dir or out.with_name(out.name + "-training")
    engine = load_engine(settings.start, device=_device(run.device), dtype="float32")
    # the grown model's shape decides which samples fit; checked before any training
    grown = grow_transformer(engine.transformer, resolution, null_condition=settings.null_condition)
    data, train_ids, val_ids, checksum = _samples(run, engine, grown, resolution)
    del grown
    written, result = train_full(
        engine,
        data,
        train_ids,
        val_ids,
        resolution=resolution,
        out=out,
        config=run.config,
        work_dir=work_dir,
        null_condition=settings.null_condition,
        training_data_checksum=checksum,
        resume=run.resume,
        progress=progress,
    )
    return FullTrained(written, result)


def _device(choice: str | None) -> str | None:
    """The process's device: its own GPU under a multi-process launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        cpu = choice == "cpu" or not torch.cuda.is_available()
        return str(PartialState(cpu=cpu).device)
    return choice


def _samples(run: TrainingRun, engine: Any, transformer: Any, resolution: int):
    """``(samples, train indices, val indices, checksum)`` from the cache or the dataset,
    for ``transformer`` (the engine's, or the grown one of ``train full``) at
    ``resolution`` px."""
    from histosynth.synthesis.adapters import base_weight_hash
    from histosynth.synthesis.training import check_samples_fit, split_indices

    cache, dataset, seed = run.cache, run.dataset, run.config.seed
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
            cache, resolution=resolution, preload=run.preload, seed=seed
        )
        checksum = info.content_hash
    else:
        from histosynth.synthesis.cache import OnTheFlyDataset
        from histosynth.workflows.cache import dataset_tiles

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
            seed=seed,
        )
        digest = hashlib.sha256()
        for tile in tiles:
            digest.update(
                f"{tile.tile_id}\0{hashlib.sha256(tile.image.tobytes()).hexdigest()}\n".encode()
            )
        checksum = digest.hexdigest()
    if len(data) == 0:
        raise InputError("holds no samples", path=cache or dataset)
    train_ids, val_ids = split_indices(len(data), run.config.val_fraction, seed)
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


def describe_training(result: Any) -> str:
    """One line: the held-out loss (first → last), steps, seconds and samples/s of a run."""
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
