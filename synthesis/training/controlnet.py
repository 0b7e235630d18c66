"""Train a vessel-mask ControlNet on a PixCell base and put it into the ControlNet library.

The ControlNet (:class:`~histosynth.synthesis.models.controlnet.PixCellControlNet`) starts
as a copy of the base's first ``layers`` blocks with zero projections, so step 0 is the
base exactly. Only its weights train; the base stays frozen (float32, under autocast with
mixed precision). Every sample brings its vessel mask from the cache (a tile without
vessels trains "no vessel here"); the UNI rows are dropped to the learned null condition
with ``config.uncond_prob`` and the mask to the null mask with ``mask_dropout``,
independently, so that each condition gets its own guidance scale at generation time
(:mod:`histosynth.synthesis.pipelines.control`). Checkpoints, exact resume, validation
and samples are the trainer's (:func:`~histosynth.synthesis.training.loop.run_training`).

The result lands in the library with its metadata (:class:`~histosynth.synthesis.
controlnet_library.ControlNetInfo`): base id and weight hash, the cache's content hash
(recomputed from the data), resolution, layers, validation metrics — ``val_loss`` with
the masks and ``val_loss_null_mask`` with the null mask, whose gap is what the mask tells
the model — and the training settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from histosynth.synthesis.controlnet_library import (
    ControlNetInfo,
    save_controlnet,
    validate_controlnet_name,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.training.config import TrainConfig
from histosynth.synthesis.training.data import (
    EncodedSamples,
    sample_generator,
    verified_checksum,
)
from histosynth.synthesis.training.loop import (
    TrainResult,
    apply_model_options,
    run_engine_training,
    validation_losses,
)
from histosynth.synthesis.training.lora import check_cache_fits

__all__ = ["check_masks", "train_controlnet"]


def check_masks(data: EncodedSamples, indices: Sequence[int], resolution: int) -> None:
    """The samples must carry vessel masks of ``resolution``² px, and at least one of
    ``indices`` a vessel (one :class:`EngineError` line naming the cache otherwise)."""
    where = getattr(getattr(data, "info", None), "path", None)
    for index in indices:
        item = data.sample(index, sample_generator(0, "mask-check", index))
        mask = item.get("mask")
        if mask is None:
            raise EngineError(
                "holds no vessel masks; a ControlNet trains on each tile's mask (build the "
                "cache with `histosynth cache build`)",
                path=where,
                item="mask",
            )
        shape = tuple(torch.as_tensor(mask).shape)
        if shape != (resolution, resolution):
            raise EngineError(
                f"tile {item.get('tile_id', index)!r} has a mask of {shape[-1]}×{shape[0]} px; "
                f"the tiles are {resolution}×{resolution} px",
                path=where,
                item="mask",
            )
        if bool(torch.as_tensor(mask).any()):
            return
    raise EngineError(
        "every training tile's vessel mask is empty; a ControlNet needs tiles with vessels",
        path=where,
        item="mask",
    )


def train_controlnet(
    engine: Any,
    data: EncodedSamples,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    name: str,
    folder: str | Path,
    config: TrainConfig,
    work_dir: str | Path,
    layers: int = 2,
    mask_dropout: float = 0.1,
    mask_loss_weight: float = 1.0,
    training_data_checksum: str = "",
    overwrite: bool = False,
    resume: bool = False,
    on_checkpoint: Callable[[Any, int], None] | None = None,
    progress: Callable[..., Any] | None = None,
) -> tuple[ControlNetInfo | None, TrainResult]:
    """Train ControlNet ``name`` (``layers`` blocks) on ``engine``'s frozen transformer and
    save it to ``folder``; ``mask_loss_weight`` weighs the latent cells a vessel touches
    in the loss (``diffusion_loss``). Returns ``(info, result)``; ``info`` is ``None`` on processes
    other than the main one (they write nothing).

    Raises:
        EngineError: ``folder`` exists (without ``overwrite``); samples without masks, with
            masks of another size or none with a vessel; a cache that does not fit the
            model; a checkpoint of another configuration; bad settings.
    """
    from histosynth.synthesis.adapters import base_weight_hash
    from histosynth.synthesis.models.controlnet import PixCellControlNet
    from histosynth.synthesis.pipelines.control import ControlledTransformer

    validate_controlnet_name(name)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise EngineError(
            f"a ControlNet named {name!r} already exists; pass --overwrite to replace it",
            path=folder,
        )
    _check_mask_settings(mask_dropout, mask_loss_weight)
    base = engine.transformer
    check_cache_fits(data, base, training_data_checksum)
    down = int(engine.codec.downsample)
    resolution = int(base.config.sample_size) * down
    check_masks(data, train_indices, resolution)
    apply_model_options(base, config)
    base.requires_grad_(False).eval()
    base_hash = base_weight_hash(base)
    widths = _encoder_widths(down, int(base.config.num_attention_heads))
    with torch.random.fork_rng(devices=[]):  # the mask encoder's init is seeded
        torch.manual_seed(config.seed)
        controlnet = PixCellControlNet.from_transformer(
            base, num_layers=layers, mask_encoder_channels=widths, vae_scale_factor=down
        )
    controlnet.float().train().requires_grad_(True)
    model = ControlledTransformer(base, controlnet)
    fingerprint = {
        "kind": "controlnet",
        "base_hash": base_hash,
        "training_data": training_data_checksum,
        "name": name,
        "layers": int(layers),
        "mask_dropout": float(mask_dropout),
        "resolution": resolution,
    }
    if float(mask_loss_weight) != 1.0:  # runs from before the option resume as they were
        fingerprint["mask_loss_weight"] = float(mask_loss_weight)
    result = run_engine_training(
        engine,
        model,
        data,
        train_indices,
        val_indices,
        config=config,
        work_dir=work_dir,
        fingerprint=fingerprint,
        resume=resume,
        on_checkpoint=on_checkpoint,
        progress=progress,
        mask_dropout=float(mask_dropout),
        mask_loss_weight=float(mask_loss_weight),
    )
    if not result.main_process:
        return None, result
    metrics = {k: round(float(v), 6) for k, v in result.metrics.items()}
    if val_indices:
        null = validation_losses(
            model,
            data,
            val_indices,
            engine.make_scheduler("ddpm"),
            seed=config.seed,
            batch_size=config.batch_size,
            timestep_range=config.timestep_range,
            mask_dropout=1.0,
        )
        metrics["val_loss_null_mask"] = round(float(null["val_loss"]), 6)
    info = ControlNetInfo(
        name=name,
        base_hash=base_hash,
        resolution=resolution,
        layers=int(layers),
        base_id=str(engine.model_id),
        training_data_checksum=verified_checksum(data, training_data_checksum),
        metrics=metrics,
        training={
            **config.to_dict(),
            "mask_dropout": float(mask_dropout),
            "mask_loss_weight": float(mask_loss_weight),
            "steps_run": result.steps,
            "seconds": round(result.seconds, 1),
            "images_per_second": round(result.images_per_second, 3),
            "train_samples": len(train_indices),
            "val_samples": len(val_indices),
            "resumed_from": result.resumed_from,
        },
    )
    saved = save_controlnet(controlnet, folder, info, overwrite=overwrite)
    return dataclasses.replace(saved), result


def _check_mask_settings(mask_dropout: float, mask_loss_weight: float) -> None:
    if not 0 <= float(mask_dropout) < 1:
        raise EngineError(f"expected a mask dropout in [0, 1), got {mask_dropout}")
    if not 1 <= float(mask_loss_weight) <= 100:
        raise EngineError(f"expected a mask loss weight in [1, 100], got {mask_loss_weight}")


def _encoder_widths(downsample: int, heads: int) -> tuple[int, ...]:
    """Mask encoder widths for a VAE of ``downsample`` px per latent cell: one per conv,
    doubling from 16 and capped by the transformer's size (``heads × 16``)."""
    steps = max(int(downsample).bit_length() - 1, 0)
    top = max(16, heads * 16)
    return tuple(min(16 * 2**k, top) for k in range(steps + 1))
