"""Train a LoRA style adapter on a PixCell base and put it into the adapter library.

The adapter is the library's own kind (:mod:`histosynth.synthesis.adapters`): rank r, α,
cross-attention targets only, created with peft's ``add_adapter`` so only the LoRA
matrices train; the base keeps its float32 weights (mixed precision runs the forward
under autocast, the LoRA parameters stay float32). The result lands in the library with
its metadata — domain, resolution, base id and weight hash, rank, α, creation time, the
cache's content hash as training-set checksum, validation metrics, steps — and works at
once with ``synthesize --adapter NAME``.

From a cache (``CacheDataset``) the checksum recorded is the one computed from the data
(:meth:`~histosynth.synthesis.cache.CacheDataset.verified_content_hash`: every sample's
digest recomputed, those training did not read in one pass before saving), never the
stored attribute; the cache's shapes are checked against the model before training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from histosynth.synthesis.adapters import (
    AdapterInfo,
    base_weight_hash,
    create_adapter,
    save_adapter,
    unload_adapter,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.training.config import TrainConfig
from histosynth.synthesis.training.data import EncodedSamples, verified_checksum
from histosynth.synthesis.training.fit import check_samples_fit
from histosynth.synthesis.training.loop import (
    TrainResult,
    apply_model_options,
    run_engine_training,
)

__all__ = ["train_lora"]


def train_lora(
    engine: Any,
    data: EncodedSamples,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    name: str,
    folder: str | Path,
    config: TrainConfig,
    work_dir: str | Path,
    rank: int = 4,
    alpha: float = 4,
    domain: str = "",
    training_data_checksum: str = "",
    overwrite: bool = False,
    resume: bool = False,
    on_checkpoint: Callable[[Any, int], None] | None = None,
    progress: Callable[..., Any] | None = None,
) -> tuple[AdapterInfo | None, TrainResult]:
    """Train adapter ``name`` on ``engine``'s transformer and save it to ``folder``.

    The adapter stays loaded (and active) on ``engine.transformer`` afterwards. In a
    multi-process run only the main process writes the adapter (others get ``None``).

    ``training_data_checksum``: the data's checksum; from a cache it must be the
    cache's content hash (or empty), and the hash recomputed from the cache's data is
    what the adapter records.

    Raises:
        EngineError: ``folder`` exists (without ``overwrite``), an adapter of that name
            is loaded, a checkpoint of another configuration, bad settings; a cache whose
            latents, rows or tile size do not fit the model, whose samples fail their
            checks, or whose content hash is not ``training_data_checksum``.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise EngineError(
            f"an adapter named {name!r} already exists; pass --overwrite to replace it",
            path=folder,
        )
    model = engine.transformer
    check_cache_fits(data, model, training_data_checksum)
    apply_model_options(model, config)
    base_hash = base_weight_hash(model)
    resolution = int(model.config.sample_size) * 8
    with torch.random.fork_rng(devices=[]):  # the LoRA A init is seeded, not global
        torch.manual_seed(config.seed)
        info = create_adapter(
            model,
            name,
            rank=rank,
            alpha=alpha,
            domain=domain,
            resolution=resolution,
            base_id=engine.model_id,
            training_data_checksum=training_data_checksum,
        )
    fingerprint = {
        "kind": "lora",
        "base_hash": base_hash,
        "training_data": training_data_checksum,
        "name": name,
        "rank": int(rank),
        "alpha": float(alpha),
        "resolution": resolution,
    }
    try:
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
        )
    except BaseException:
        unload_adapter(model, name)
        raise
    if not result.main_process:
        return None, result
    try:
        checksum = verified_checksum(data, training_data_checksum)
    except BaseException:
        unload_adapter(model, name)
        raise
    info = dataclasses.replace(
        info,
        training_data_checksum=checksum,
        metrics={k: round(float(v), 6) for k, v in result.metrics.items()},
        training={
            **config.to_dict(),
            "steps_run": result.steps,
            "seconds": round(result.seconds, 1),
            "images_per_second": round(result.images_per_second, 3),
            "train_samples": len(train_indices),
            "val_samples": len(val_indices),
            "resumed_from": result.resumed_from,
        },
    )
    saved = save_adapter(model, name, folder, info=info, overwrite=overwrite)
    return saved, result


def check_cache_fits(data: Any, model: Any, checksum: str) -> None:
    """A cache's samples (``data.info``, a ``CacheInfo``, at ``data.resolution`` px) must
    fit ``model``: latent channels, row width and count; a checksum given must be the
    cache's content hash. Other data (on-the-fly encoding) is not checked here."""
    info, resolution = getattr(data, "info", None), getattr(data, "resolution", None)
    if info is None or resolution is None:
        return
    cfg = model.config
    check_samples_fit(
        info,
        resolution=int(resolution),
        tokens=int(cfg.caption_num_tokens),
        dim=int(cfg.caption_channels),
        latent_channels=int(cfg.in_channels),
    )
    if checksum and checksum != info.content_hash:
        raise EngineError(
            f"the training data checksum given ({checksum[:16]}…) is not the cache's "
            f"content hash ({info.content_hash[:16]}…)",
            path=info.path,
        )
